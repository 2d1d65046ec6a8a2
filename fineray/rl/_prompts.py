"""GRPO prompts: `data` read as for supervised runs, each example cut before its last assistant turn.

That turn (when there is one) is the reference answer the verifiers compare with; a `prompt` record has none,
and its other columns (`reference`, `answer`, `solution`, ...) go to the reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fineray.train.config import RunConfig
from fineray.train.data import Example, load_train_val
from fineray.train.templates import prompt_text

__all__ = ["PromptItem", "build_prompts"]

_REFERENCE_KEYS = ("reference", "answer", "solution", "ground_truth")


@dataclass
class PromptItem:
    """One RL prompt: its chat messages and token ids, the reference answer and the record's columns."""

    messages: list[dict[str, str]]
    ids: list[int]
    text: str
    reference: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def _item(tokenizer: Any, ex: Example) -> PromptItem | None:
    msgs = ex.messages or []
    record = ex.meta.get("record") or {}
    has_answer = any(m["role"] == "assistant" for m in msgs)
    if has_answer:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text, reference, prompt = prompt_text(tokenizer, msgs), msgs[last]["content"], msgs[:last]
    elif msgs:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        reference = next((str(record[k]) for k in _REFERENCE_KEYS if record.get(k) is not None), None)
        prompt = msgs
    else:
        return None  # plain text has no prompt to answer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    columns = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
    return PromptItem(prompt, ids, text, reference, columns, ex.source)


def build_prompts(cfg: RunConfig, tokenizer: Any, max_new_tokens: int, stats: dict[str, int] | None = None
                  ) -> tuple[list[PromptItem], list[PromptItem]]:
    """Training and validation prompts; prompts leaving no room for `max_new_tokens` within
    `data.max_seq_len` are dropped and counted."""
    stats = stats if stats is not None else {}
    train_ex, val_ex = load_train_val(cfg.data, cfg.train.seed, stats)
    out = []
    for name, examples in (("train", train_ex), ("val", val_ex)):
        items = [it for it in (_item(tokenizer, ex) for ex in examples) if it is not None]
        kept = [it for it in items if len(it) + max_new_tokens <= cfg.data.max_seq_len]
        stats[f"{name}_dropped_too_long"] = len(items) - len(kept)
        out.append(kept)
    train, val = out
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    if not train:
        raise ValueError(f"no prompt leaves room for rl.max_new_tokens within data.max_seq_len={cfg.data.max_seq_len}")
    return train, val
