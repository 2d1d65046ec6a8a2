"""What the engine's two batch kinds share: a row (one sequence being generated) and the batch interface.

The engine (fineray.serve.engine) owns requests, adapters and text; a batch owns the model's KV cache and
forward passes. Each engine iteration asks the batch to `prefill` (admitted prompts; returns the first token
of every row whose prompt is now fully cached) and then to `decode` one token for every running row; rows
the engine finishes are handed back with `remove`.

* `fineray.serve._dynamic.DynamicBatch`: a transformers `DynamicCache`, grown and trimmed as rows come and
  go (any architecture; the CPU default).
* `fineray.serve._static.StaticBatch`: fixed KV slots and decode steps captured as CUDA graphs (Llama-family
  models; the GPU default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fineray.serve.sampling import RowSampler, TextTracker

__all__ = ["Batch", "Row", "StepReport"]

StepReport = Callable[[str, int, int, float], None]  # (kind, rows, distinct adapters, seconds)


class Row:
    """One sequence: its request, sampler, text tracker, adapter and where it stands."""

    __slots__ = ("adapter", "cached", "done", "generated", "length", "next_token", "req", "sampler", "seed", "slot",
                 "tracker")

    def __init__(self, req: Any, sampler: RowSampler, tracker: TextTracker, adapter: str, seed: int = 0):
        self.req, self.sampler, self.tracker, self.adapter, self.seed = req, sampler, tracker, adapter, seed
        self.next_token, self.length, self.generated, self.done = 0, len(req.prompt_ids), 0, False
        self.slot = -1  # static batch: the KV slot
        self.cached = 0  # static batch: prompt tokens already in the cache


class Batch(Protocol):
    """The model side of the engine loop (called from the engine thread only)."""

    def room(self, pending: int, oldest_wait_s: float) -> int:
        """How many queued rows to admit now."""

    def admit(self, rows: list[Row]) -> None:
        """Take new rows (their prompts are prefilled by the next `prefill` calls)."""

    def prefill(self) -> list[tuple[Row, int]]:
        """Run (part of) the admitted prompts; returns (row, first token) for prompts now fully cached."""

    def decode(self) -> list[tuple[Row, int]]:
        """One token for every running row whose prompt is cached."""

    def remove(self, rows: list[Row]) -> None:
        """Forget rows (finished or cancelled); their cache space is reused."""

    def rows(self) -> list[Row]:
        """Every row held (prefilling or decoding)."""

    def clear(self) -> None:
        """Drop everything (after a failed forward pass)."""
