"""The dynamic-cache batch: any causal LM, a transformers `DynamicCache` that grows and shrinks with the rows.

New prompts are prefilled together (left-padded, one forward pass) and merged into the running batch
between decode steps (see `fineray.serve.kvcache`). Joining copies the whole cache, so with a batch running
new rows wait until a quarter of the free rows can be filled at once, or the oldest has waited a few decode
steps. Models whose cache is not a plain dynamic KV cache (sliding-window or linear-attention layers) fall
back to static batching: finished rows ride along until the whole batch is done.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fineray.serve import kvcache
from fineray.serve._batch import Row, StepReport
from fineray.serve.lora_stack import LoraAdapters
from fineray.serve.sampling import sample_rows

__all__ = ["DynamicBatch"]


class DynamicBatch:
    """Rows in one left-padded `DynamicCache` (see `fineray.serve._batch.Batch`)."""

    def __init__(self, model: Any, lora: LoraAdapters, device: torch.device, *, max_rows: int, pad_id: int,
                 continuous: bool, report: StepReport):
        self.model, self.lora, self.device, self.pad_id = model, lora, device, pad_id
        self.max_rows, self.continuous, self.report = max_rows, continuous, report
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, and goes in 5.40)
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._new: list[Row] = []  # admitted, not yet prefilled
        self._fresh: tuple[Any, torch.Tensor, list[Row]] | None = None  # prefilled, not yet merged
        self._plain = True  # cleared when the model's cache layers cannot be merged/trimmed
        self._step_s = 0.01  # moving average of a decode step (admission waits a few of them at most)

    def rows(self) -> list[Row]:
        return self._rows + self._new + (self._fresh[2] if self._fresh else [])

    def room(self, pending: int, oldest_wait_s: float) -> int:
        held = len(self.rows())
        if not held:
            return min(pending, self.max_rows)
        if not (self.continuous and self._plain):
            return 0
        free = self.max_rows - held
        if free > 0 and (pending >= max(1, free // 4) or oldest_wait_s > 4 * self._step_s):
            return min(pending, free)
        return 0

    def admit(self, rows: list[Row]) -> None:
        self._new += rows

    def clear(self) -> None:
        self._rows, self._cache, self._mask, self._new, self._fresh = [], None, None, [], None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[Row],
                 kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        self.lora.select([r.adapter for r in rows])
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
        finally:
            self.lora.done()
        logits = out.logits[:, -1, :]
        self.report(kind, len(rows), len({r.adapter for r in rows}), time.perf_counter() - t0)
        return logits

    def prefill(self) -> list[tuple[Row, int]]:
        from transformers import DynamicCache

        if not self._new:
            return []
        rows, self._new = self._new, []
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(r.req.prompt_ids):] = torch.tensor(r.req.prompt_ids)
            mask[i, width - len(r.req.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, rows, "prefill")
        self._plain = self._plain and kvcache.is_plain(cache)
        self._fresh = (cache, mask, rows)
        return list(zip(rows, sample_rows(logits, [r.sampler for r in rows])))

    def remove(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        self._new = [r for r in self._new if id(r) not in gone]
        if not self._plain:  # cannot shrink this cache: finished rows ride along until all are done
            if self._fresh and all(r.done for r in self._fresh[2]):
                self._fresh = None
            if all(r.done for r in self._rows):
                self._rows, self._cache, self._mask = [], None, None
            return
        if self._fresh:
            cache, mask, fresh = self._fresh
            keep = [i for i, r in enumerate(fresh) if id(r) not in gone]
            if not keep:
                self._fresh = None
            elif len(keep) < len(fresh):
                self._fresh = (cache, kvcache.select_rows(cache, mask, keep), [fresh[i] for i in keep])
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        self._mask = kvcache.trim(self._cache, kvcache.select_rows(self._cache, self._mask, keep))
        self._rows = [self._rows[i] for i in keep]

    def _merge(self) -> None:
        if self._fresh is None:
            return
        cache, mask, rows = self._fresh
        self._fresh = None
        if not self._rows:
            self._cache, self._rows = cache, rows
            self._mask = kvcache.trim(cache, mask) if self._plain else mask
            return
        assert self._mask is not None
        self._mask = kvcache.join(self._cache, self._mask, cache, mask)
        self._rows = self._rows + rows

    def decode(self) -> list[tuple[Row, int]]:
        self._merge()
        rows = self._rows
        if not rows:
            return []
        assert self._mask is not None
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        pos = torch.tensor([[r.length] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype,
                                                       device=self.device)], dim=1)
        t0 = time.perf_counter()
        logits = self._forward(ids, self._mask, pos, self._cache, rows, "decode")
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t0)  # moving average
        for r in rows:
            r.length += 1
        tokens = sample_rows(logits, [r.sampler for r in rows])
        return [(r, t) for r, t in zip(rows, tokens) if not r.done]
