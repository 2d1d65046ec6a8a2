"""Preference pairs: the `preference` data format, tokenised pairs and their batches.

A record is a prompt with a chosen and a rejected response, in any of these layouts (auto-detected):
  * text: `{"prompt": str, "chosen": str, "rejected": str}`; the prompt becomes one user turn;
  * conversational (TRL): `{"prompt": [messages], "chosen": [assistant turn] | str, "rejected": ...}`;
  * UltraFeedback-binarized: `{"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}`;
  * Anthropic HH: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}` (the shared turns
    are the prompt), or `chosen`/`rejected` as whole conversations that differ only in the last turn.
Every layout becomes an `Example` whose conversation ends in the chosen response, with the rejected response
beside it; the chat template applies as for supervised data, and only the final response carries labels.

A batch holds every chosen sequence, then every rejected one: padded rows, or one packed row with document
masks (the fast path). Either way document i and document i + n are the two sides of pair i, so chosen and
rejected go through one forward.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import torch

from fineray.train.data import DataError, Example
from fineray.train.templates import IGNORE_INDEX, Tokenized, tokenize_example

__all__ = ["Pair", "check_pairs", "collate_left", "pair_batch", "preference_example", "tokenize_pairs"]

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str) -> list[dict[str, str]] | None:
    """Anthropic HH text (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as chat turns; None if it is not HH."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _turns(value: Any, key: str) -> list[dict[str, str]]:
    """A field as chat turns: HH text, a plain response string (one assistant turn), or a list of messages."""
    if isinstance(value, str):
        return _hh_turns(value) or [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"field {key!r} must be a string or a non-empty list of messages")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise DataError(f"{key}[{i}] must have string fields 'role' and 'content'")
        if t["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{key}[{i}].role: unknown role {t['role']!r}")
        out.append({"role": t["role"], "content": t["content"]})
    return out


def preference_example(record: dict[str, Any], system_prompt: str | None = None,
                       task_prefix: str | None = None) -> Example:
    """Normalise one preference record (any layout above) into an Example (raises DataError without location)."""
    chosen, rejected = _turns(record.get("chosen"), "chosen"), _turns(record.get("rejected"), "rejected")
    prompt_field = record.get("prompt")
    if prompt_field is None:
        prompt = chosen[:-1]
    elif isinstance(prompt_field, str):
        prompt = _hh_turns(prompt_field) or [{"role": "user", "content": prompt_field}]
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt = prompt[:-1]  # HH prompts end with an empty "Assistant:" turn
    else:
        prompt = _turns(prompt_field, "prompt")
    # Responses given as whole conversations (UltraFeedback, HH) repeat the prompt: keep only the last turn.
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) > 1 and turns[:-1] != prompt:
            raise DataError(f"the turns before the final {name} response differ from the prompt")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise DataError("a preference pair needs a prompt ending in a user turn (field 'prompt', or turns "
                        "before the final response)")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(f"the final {name} turn must be an assistant response")
    msgs = [dict(m) for m in prompt]
    system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else system_prompt
    if task_prefix:
        first_user = next(m for m in msgs if m["role"] == "user")
        first_user["content"] = f"[{task_prefix}] {first_user['content']}"
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return Example(messages=msgs + [chosen[-1]], rejected=rejected[-1]["content"])


@dataclass
class Pair:
    """A tokenised pair. `key` identifies it by content (for precomputed reference log-probs); `ref` holds the
    reference log-probs (chosen, rejected) once known."""

    chosen: Tokenized
    rejected: Tokenized
    key: str
    ref: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _prompt_len(t: Tokenized) -> int:
    return next((i for i, x in enumerate(t.labels) if x != IGNORE_INDEX), len(t))


def _keep_prompt_end(t: Tokenized, max_prompt: int) -> Tokenized:
    cut = _prompt_len(t) - max_prompt
    return t if cut <= 0 else Tokenized(t.input_ids[cut:], t.labels[cut:])


def _key(c: Tokenized, r: Tokenized) -> str:
    h = hashlib.sha1(repr((c.input_ids, c.labels, r.input_ids, r.labels)).encode())
    return h.hexdigest()[:20]


def check_pairs(examples: list[Example], objective: str = "dpo") -> None:
    """Raise DataError naming the first example (file and line) that is not a preference pair."""
    for ex in examples:
        if ex.rejected is None or not ex.messages:
            raise DataError(f"{ex.source}: not a preference pair: objective {objective} needs prompt + chosen + "
                            "rejected records (data.format: preference)")


def tokenize_pairs(tokenizer: Any, examples: list[Example], max_seq_len: int, max_prompt_len: int | None = None,
                   stats: dict[str, int] | None = None, prefix: str = "") -> list[Pair]:
    """Tokenise preference examples (labels on the final response only). Prompts over `max_prompt_len` keep
    their last tokens (counted as `truncated_prompt`); pairs with a side over `max_seq_len` or without a
    response token are dropped and counted, as for supervised data.

    Raises:
        DataError: an example that is not a pair, named by its source (file and line).
    """
    out: list[Pair] = []
    counts = {"dropped_too_long": 0, "dropped_no_target": 0, "truncated_prompt": 0}
    check_pairs(examples)
    for ex in examples:
        sides = []
        for response in (None, ex.rejected):
            msgs = ex.messages if response is None else ex.messages[:-1] + [{"role": "assistant", "content": response}]
            t = tokenize_example(tokenizer, Example(messages=msgs), last_turn_only=True)
            if max_prompt_len:
                cut = _keep_prompt_end(t, max_prompt_len)
                counts["truncated_prompt"] += cut is not t and response is None
                t = cut
            sides.append(t)
        c, r = sides
        if max(len(c), len(r)) > max_seq_len:
            counts["dropped_too_long"] += 1
        elif not c.num_target_tokens or not r.num_target_tokens:
            counts["dropped_no_target"] += 1
        else:
            out.append(Pair(c, r, _key(c, r)))
    if stats is not None:
        stats.update({f"{prefix}{k}": v for k, v in counts.items()})
    return out


def collate_left(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded rows with position ids counted from each row's first real token: every row's last token is
    in the last column (where a sequence-classification head reads its score)."""
    width = max(len(t) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        ids[i, width - len(t):] = torch.tensor(t.input_ids)
        mask[i, width - len(t):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def pair_batch(pairs: list[Pair], pad_id: int, fast: Any, left_padded: bool = False) -> dict[str, Any]:
    """One batch of pairs: chosen documents 0..n-1, rejected documents n..2n-1 (packed when `fast.packing`).

    `n_target` is the number of pairs (the preference losses are means over pairs, so the loop weighs
    micro-batch chunks by it); `n_tokens` counts real tokens; `ref_logps` (2n,) is set when every pair has
    precomputed reference log-probs.
    """
    from fineray.train.fastpath import make_batch

    docs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if left_padded:
        batch: dict[str, Any] = collate_left(docs, pad_id)
        batch["n_tokens"] = int(batch["attention_mask"].sum())
    else:
        batch = make_batch(docs, pad_id, fast)
    batch["n_target"], batch["n_docs"] = len(pairs), len(docs)
    batch["pairs"] = pairs  # host objects (to_device leaves them): a computed reference can be kept on them
    refs = [p.ref for p in pairs]
    if all(r is not None for r in refs):
        batch["ref_logps"] = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
    return batch
