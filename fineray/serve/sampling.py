"""Per-row sampling and incremental detokenisation for the batched decode loop.

Every row of a batch keeps its own parameters (temperature, top-p, penalties, logit bias, seed), so requests
with different settings share one forward pass and still sample exactly as if they ran alone: a seeded
request draws from its own `torch.Generator`, whatever else is in the batch.

`sample_on_device` is the fast path's sampler: the whole batch in a few tensor ops, no host sync, so it
can sit inside a captured CUDA graph. Its randomness is counter-based (a hash of the row's seed, its step
and the token id, turned into Gumbel noise: the Gumbel-max trick draws from softmax(logits / T)), so a
seeded row's draws depend on nothing but its seed and step, never on the batch, and no generator state
has to live in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RowSampler", "SamplingParams", "TextTracker", "needs_host", "sample_on_device", "sample_rows"]


@dataclass
class SamplingParams:
    """Generation settings of one sequence (OpenAI semantics; temperature 0 = greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (benchmarks; vLLM's `ignore_eos`)
    response_format: dict[str, Any] | None = None  # OpenAI's json_schema / json_object (the vLLM engine only)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class RowSampler:
    """Sampling state of one row: its generator and (when penalties are on) its token counts."""

    def __init__(self, params: SamplingParams, vocab: int, device: torch.device, fallback: torch.Generator):
        self.p = params
        self.greedy = params.temperature == 0
        self.gen = fallback
        if not self.greedy and params.seed is not None:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        self.counts = (torch.zeros(vocab, device=device)
                       if params.presence_penalty or params.frequency_penalty else None)
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            for tok, b in params.logit_bias.items():
                if 0 <= tok < vocab:
                    self.bias[tok] = b

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1


@torch.no_grad()
def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """Next token of every row from last-position logits `(rows, vocab)`."""
    logits = logits.float()
    out: list[int] = []
    greedy_idx = [i for i, s in enumerate(samplers) if s.greedy and s.counts is None and s.bias is None]
    argmax = logits.argmax(-1).tolist() if greedy_idx else None
    for i, s in enumerate(samplers):
        if argmax is not None and s.greedy and s.counts is None and s.bias is None:
            out.append(argmax[i])
            continue
        row = logits[i]
        if s.bias is not None:
            row = row + s.bias
        if s.counts is not None:  # OpenAI: logit -= count * frequency + (count > 0) * presence
            row = row - s.counts * s.p.frequency_penalty - (s.counts > 0).float() * s.p.presence_penalty
        if s.greedy:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / s.p.temperature, dim=-1)
        if s.p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.p.top_p  # smallest prefix whose mass reaches top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=s.gen)))
    return out


def needs_host(params: SamplingParams) -> bool:
    """Whether a row needs the per-row host sampler (penalties and logit bias keep per-row vocab state)."""
    return bool(params.presence_penalty or params.frequency_penalty or params.logit_bias)


def _signed(x: int) -> int:
    x &= 0xFFFF_FFFF_FFFF_FFFF
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (wrapping int64 arithmetic)."""
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def seed_value(seed: int) -> int:
    """A Python seed as the signed 64-bit value `sample_on_device` takes."""
    return _signed(seed)


def sample_on_device(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                     step: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
    """Next token per row, `(rows,)` int64, without leaving the device.

    Args:
        logits: `(rows, vocab)` float. temperature, top_p: `(rows,)` float (temperature 0 = greedy).
        seed, step: `(rows,)` int64; the noise of (seed, step) is the same in any batch.
        greedy_only: every row is greedy (skips the noise and the top-p sort).
    """
    best = logits.argmax(-1)
    if greedy_only:
        return best
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p (the first always)
    ordered, idx = scaled.sort(-1, descending=True)
    probs = torch.softmax(ordered, -1)
    drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
    scaled = torch.full_like(scaled, float("-inf")).scatter(-1, idx, ordered.masked_fill(drop, float("-inf")))
    vocab = torch.arange(logits.shape[1], device=logits.device, dtype=torch.int64)
    row = _mix64(seed * _GOLDEN + step)
    bits = _srl(_mix64(row.unsqueeze(1) + vocab * _GOLDEN), 40)  # 24 random bits per (row, token)
    uniform = (bits.float() + 0.5) * (1.0 / (1 << 24))
    gumbel = -torch.log(-torch.log(uniform))
    return torch.where(greedy, best, (scaled + gumbel).argmax(-1))


class TextTracker:
    """Turns a growing token sequence into text deltas, cut at stop strings.

    Decoding is incremental (as in TGI/vLLM): only the tokens since the last complete character are decoded,
    with the few tokens before them as context, so a step costs O(1) instead of re-decoding the whole
    sequence. Text that may still change is held back: an incomplete UTF-8 sequence of a byte-level
    tokenizer (decoded as a trailing replacement character) and any suffix that could start a stop string.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:_read] (cut at a stop string once one is hit)
        self.emitted = 0  # characters already sent
        self._prefix = 0  # ids[_prefix:_read] are decoded again as context for the new tokens
        self._read = 0
        self._stopped = False

    def _decode_new(self, final: bool = False) -> None:
        prefix = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        new = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new text to send, whether a stop string was hit)."""
        self.ids.append(token)
        self._decode_new()
        cut = self._first_stop()
        if cut is not None:
            self.text, self._stopped = self.text[:cut], True
            return self._advance(len(self.text)), True
        safe = len(self.text)
        for s in self.stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._advance(safe), False

    def flush(self) -> str:
        """Everything not yet sent (at the end of the sequence), incomplete characters included."""
        if self._read < len(self.ids) and not self._stopped:
            self._decode_new(final=True)
            cut = self._first_stop()
            if cut is not None:
                self.text = self.text[:cut]
        return self._advance(len(self.text))

    def _first_stop(self) -> int | None:
        if not self.stops:
            return None
        start = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _advance(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
