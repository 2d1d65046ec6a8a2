"""Rendering examples with the tokenizer's chat template, and label masking.

By default only response (assistant) tokens carry labels; prompt tokens get -100 so the loss ignores them.
The assistant span of each turn runs from the first character of its content to the end of the template's
end-of-turn marker, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fineray.train.data import Example

__all__ = ["IGNORE_INDEX", "Tokenized", "prompt_text", "render_chat", "tokenize_all", "tokenize_example"]

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    """Token ids and labels of one example (labels are -100 where no loss is computed)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of the assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(before) or not text.startswith(through):
            raise ValueError(
                "the chat template is not prefix-stable (rendering a conversation prefix changes earlier text); "
                "set data.train_on_prompt=true or use a template without that behaviour"
            )
        # Some templates put a trailing newline after the end-of-turn marker; it is not worth learning.
        end = len(through.rstrip("\n")) if through.endswith("\n") else len(through)
        spans.append((len(before), end))
    return text, spans


def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The generation prompt: every turn before the last assistant turn, plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)


def tokenize_example(tokenizer: Any, ex: Example, train_on_prompt: bool = False,
                     last_turn_only: bool = False) -> Tokenized:
    """Token ids and labels of one example (`last_turn_only`: labels on the final assistant turn only, as
    preference objectives score one response)."""
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
    assert ex.messages is not None
    text, spans = render_chat(tokenizer, ex.messages)
    if last_turn_only:
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return Tokenized(ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    return Tokenized(ids, labels)


def tokenize_all(tokenizer: Any, examples: list[Example], max_seq_len: int, train_on_prompt: bool = False,
                 stats: dict[str, int] | None = None, prefix: str = "") -> list[Tokenized]:
    """Tokenise examples, dropping (and counting) those over `max_seq_len` or with no target token."""
    out: list[Tokenized] = []
    too_long = no_target = 0
    for ex in examples:
        tk = tokenize_example(tokenizer, ex, train_on_prompt)
        if len(tk) > max_seq_len:
            too_long += 1
            continue
        if tk.num_target_tokens == 0:
            no_target += 1
            continue
        out.append(tk)
    if stats is not None:
        stats[f"{prefix}dropped_too_long"] = too_long
        stats[f"{prefix}dropped_no_target"] = no_target
    return out
