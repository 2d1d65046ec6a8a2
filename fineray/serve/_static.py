"""The static-slot batch: fixed KV slots, chunked prefill, and decode steps replayed as CUDA graphs.

Every row owns a slot of `fineray.serve._decoder.StaticDecoder`'s cache from admission to its end. Rows that
are decoding sit in slots 0..n-1 (a finished row's slot is refilled by moving the last decoding row into
it), so a decode step reads plain views of the cache. Prompts are prefilled in chunks of at most
`prefill_tokens` tokens per engine iteration, between decode steps, so a long prompt never stalls the
rows already running for more than one chunk.

A decode step's inputs live in persistent buffers (tokens, positions, write slots, adapter slots, sampling
parameters), and the step writes its own inputs for the next one (sampled token, position + 1), so while
the batch does not change, a step is one graph replay plus one read of the new tokens: no host work per
layer, no host-to-device copies. Graphs are captured lazily per (batch bucket, context bucket, LoRA mode,
sampling mode) and share one memory pool. Without CUDA (or with `graphs=False`) the same step runs eagerly,
which is what the CPU tests exercise.
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from typing import Any

import torch

from fineray.serve._batch import Row, StepReport
from fineray.serve._decoder import StaticDecoder
from fineray.serve.lora_stack import BASE, LoraAdapters
from fineray.serve.sampling import needs_host, sample_on_device, sample_rows, seed_value

__all__ = ["StaticBatch", "batch_buckets", "context_buckets", "pick_bucket"]

log = logging.getLogger(__name__)


def batch_buckets(max_rows: int) -> list[int]:
    """Batch sizes a decode graph is captured for: 1, 2, 4, 8, then steps of 8 up to 64, then of 32."""
    sizes = {1, 2, 4, 8, *range(16, 65, 8), *range(96, max_rows + 32, 32), max_rows}
    return sorted(s for s in sizes if s <= max_rows)


def context_buckets(capacity: int) -> list[int]:
    """Attended lengths a decode graph is captured for: powers of two from 64, then the capacity."""
    out, n = [], 64
    while n < capacity:
        out.append(n)
        n *= 2
    return [*out, capacity]


def pick_bucket(buckets: list[int], need: int) -> int:
    """The smallest bucket >= need (buckets sorted; the caller guarantees one exists)."""
    return buckets[bisect.bisect_left(buckets, need)]


class StaticBatch:
    """Rows in fixed KV slots over a Llama-family model (see `fineray.serve._batch.Batch`).

    Args:
        model: a model that `fineray.serve._decoder.supports`. lora: its adapter slots.
        max_rows: slots (rows decoded together). capacity: initial tokens per slot (grows on demand).
        prefill_tokens: prompt tokens prefilled per engine iteration.
        graphs: capture decode steps as CUDA graphs (CUDA only).
    """

    def __init__(self, model: Any, lora: LoraAdapters, device: torch.device, *, max_rows: int, report: StepReport,
                 capacity: int = 1024, prefill_tokens: int = 2048, graphs: bool = True,
                 rng: random.Random | None = None):
        self.lora, self.device, self.max_rows, self.report = lora, device, max_rows, report
        self.dec = StaticDecoder(model, max_rows, capacity)
        self.prefill_tokens = prefill_tokens
        self.graphs = graphs and device.type == "cuda"
        self._rng = rng or random.Random()
        self._decoding: list[Row] = []  # row i is in slot i
        self._prefilling: list[Row] = []
        self._free = set(range(max_rows))
        self._buckets = batch_buckets(max_rows)
        n = max_rows
        kw = {"device": device}
        self._tokens = torch.zeros(n, dtype=torch.long, **kw)
        self._pos = torch.zeros(n, dtype=torch.long, **kw)
        self._slot = torch.full((n,), self.dec.scratch, dtype=torch.long, **kw)
        self._live = torch.zeros(n, dtype=torch.long, **kw)
        self._adapter = torch.zeros(n, dtype=torch.long, **kw)
        self._one = torch.zeros(1, dtype=torch.long, **kw)  # the adapter slot when every row uses one adapter
        self._seed = torch.zeros(n, dtype=torch.long, **kw)
        self._step = torch.zeros(n, dtype=torch.long, **kw)
        self._temp = torch.zeros(n, dtype=torch.float32, **kw)
        self._top_p = torch.ones(n, dtype=torch.float32, **kw)
        self._out = torch.zeros(n, dtype=torch.long, **kw)
        self._logits: torch.Tensor | None = None  # (n, vocab) when a step samples on the host
        self._dirty = True  # the buffers do not describe self._decoding yet
        self._graphs: dict[tuple, Any] = {}
        self._graph_version: tuple[int, int] = (-1, -1)
        self._pool: Any = None
        self.captures = 0  # graphs captured so far (tests and benches read it)
        self.timing = False  # record CUDA events around each graph replay (benches: GPU time per step)
        self._events: list[tuple[Any, Any]] = []

    # ------------------------------------------------------------------ bookkeeping
    def rows(self) -> list[Row]:
        return self._decoding + self._prefilling

    def room(self, pending: int, oldest_wait_s: float) -> int:
        return min(pending, len(self._free))

    def admit(self, rows: list[Row]) -> None:
        need = max(len(r.req.prompt_ids) + r.req.params.max_tokens for r in rows)
        if need > self.dec.capacity and self.dec.grow(1 << (need - 1).bit_length()):
            self._drop_graphs()
        for r in rows:
            r.slot = min(self._free)
            self._free.discard(r.slot)
            r.cached = 0
            r.seed = r.req.params.seed if r.req.params.seed is not None else self._rng.getrandbits(63)
            self._prefilling.append(r)

    def clear(self) -> None:
        self._decoding, self._prefilling = [], []
        self._free = set(range(self.max_rows))
        self._dirty = True

    def remove(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        for r in [p for p in self._prefilling if id(p) in gone]:
            self._prefilling.remove(r)
            self._free.add(r.slot)
        if not any(id(r) in gone for r in self._decoding):
            return
        keep = [r for r in self._decoding if id(r) not in gone]
        n = len(keep)
        # the rows that stay keep their order; rows past the new end move into the holes below it
        holes = sorted(r.slot for r in self._decoding if id(r) in gone and r.slot < n)
        movers = [r for r in keep if r.slot >= n]
        for r, hole in zip(movers, holes):
            self.dec.move(r.slot, hole, r.length)
            r.slot = hole
        self._free.update(range(n, len(self._decoding)))
        self._decoding = sorted(keep, key=lambda r: r.slot)
        self._dirty = True

    def _join(self, row: Row) -> None:
        """A row whose prompt is cached starts decoding: it must sit in slot n (n = rows decoding)."""
        n = len(self._decoding)
        if row.slot != n:
            other = next((p for p in self._prefilling if p.slot == n), None)
            if other is None:  # slot n is free
                self.dec.move(row.slot, n, row.length)
                self._free.add(row.slot)
                self._free.discard(n)
            else:
                self.dec.swap(row.slot, n, max(row.length, other.cached))
                other.slot = row.slot
            row.slot = n
        self._decoding.append(row)
        self._dirty = True

    # ------------------------------------------------------------------ prefill (eager)
    def prefill(self) -> list[tuple[Row, int]]:
        if not self._prefilling:
            return []
        budget, chunk = self.prefill_tokens, []
        for r in self._prefilling:
            take = min(len(r.req.prompt_ids) - r.cached, budget)
            if take <= 0:
                break
            chunk.append((r, take))
            budget -= take
        t0 = time.perf_counter()
        width = max(take for _, take in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        # padding tokens go to the scratch slot (any column below the capacity will do)
        pos = torch.arange(width).clamp_(max=self.dec.capacity - 1).repeat(len(chunk), 1)
        slot = torch.full((len(chunk), width), self.dec.scratch, dtype=torch.long)
        for i, (r, take) in enumerate(chunk):
            ids[i, :take] = torch.tensor(r.req.prompt_ids[r.cached:r.cached + take])
            pos[i, :take] = torch.arange(r.cached, r.cached + take)
            slot[i, :take] = r.slot
        length = max(r.cached + take for r, take in chunk)
        ids, pos, slot = ids.to(self.device), pos.to(self.device), slot.to(self.device)
        mask = (torch.arange(length, device=self.device).view(1, 1, -1) <= pos.unsqueeze(-1))
        read = torch.tensor([r.slot for r, _ in chunk], device=self.device)
        self.lora.select([r.adapter for r, _ in chunk])
        try:
            hidden = self.dec.forward(ids, pos, self.dec.write_index(slot, pos), mask.view(len(chunk), 1, 1, width,
                                                                                              length), read, length)
        finally:
            self.lora.done()
        done = [(i, r) for i, (r, take) in enumerate(chunk) if r.cached + take == len(r.req.prompt_ids)]
        for r, take in chunk:
            r.cached += take
        out: list[tuple[Row, int]] = []
        if done:
            last = torch.tensor([chunk[i][1] - 1 for i, _ in done], device=self.device)
            rows_idx = torch.tensor([i for i, _ in done], device=self.device)
            logits = self.dec.logits(hidden[rows_idx, last])
            tokens = self._sample_eager(logits, [r for _, r in done])
            for (_, r), tok in zip(done, tokens):
                self._prefilling.remove(r)
                self._join(r)
                out.append((r, tok))
        self.report("prefill", len(chunk), len({r.adapter for r, _ in chunk}), time.perf_counter() - t0)
        return out

    def _sample_eager(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        if any(needs_host(r.req.params) for r in rows):
            return sample_rows(logits, [r.sampler for r in rows])
        p = [r.req.params for r in rows]
        kw = {"device": self.device}
        return sample_on_device(
            logits, torch.tensor([x.temperature for x in p], dtype=torch.float32, **kw),
            torch.tensor([x.top_p for x in p], dtype=torch.float32, **kw),
            torch.tensor([seed_value(r.seed) for r in rows], dtype=torch.long, **kw),
            torch.tensor([r.generated for r in rows], dtype=torch.long, **kw),
            greedy_only=all(x.temperature == 0 for x in p)).tolist()

    # ------------------------------------------------------------------ decode (graphs)
    def _upload(self) -> None:
        """Rewrite the step buffers from the rows (after the batch changed or the host sampled)."""
        rows, n = self._decoding, len(self._decoding)
        ints = torch.zeros((6, self.max_rows), dtype=torch.long)
        floats = torch.zeros((2, self.max_rows), dtype=torch.float32)
        ints[2] = self.dec.scratch
        floats[1] = 1.0
        if n:
            ints[:, :n] = torch.tensor([[r.next_token for r in rows], [r.length for r in rows], [r.slot for r in rows],
                                        [1] * n, [self.lora.slot(r.adapter) for r in rows],
                                        [seed_value(r.seed) for r in rows]])
            floats[:, :n] = torch.tensor([[r.req.params.temperature for r in rows], [r.req.params.top_p for r in rows]])
        for buf, src in zip((self._tokens, self._pos, self._slot, self._live, self._adapter, self._seed), ints):
            buf.copy_(src, non_blocking=True)
        self._step[:n].copy_(torch.tensor([r.generated for r in rows], dtype=torch.long), non_blocking=True)
        self._temp.copy_(floats[0], non_blocking=True)
        self._top_p.copy_(floats[1], non_blocking=True)
        if n:
            self._one.fill_(self.lora.slot(rows[0].adapter))
        self._dirty = False

    def _modes(self) -> tuple[str, str]:
        rows = self._decoding
        adapters = {r.adapter for r in rows}
        lora = "none" if adapters == {BASE} else "one" if len(adapters) == 1 else "rows"
        if any(needs_host(r.req.params) for r in rows):
            sample = "host"
        elif all(r.req.params.temperature == 0 for r in rows):
            sample = "greedy"
        else:
            sample = "sample"
        return lora, sample

    def _body(self, b: int, length: int, lora: str, sample: str) -> None:
        """One decode step over buffer rows 0..b-1 (what a graph captures)."""
        ids, pos = self._tokens[:b].view(b, 1), self._pos[:b].view(b, 1)
        write = self.dec.write_index(self._slot[:b].view(b, 1), pos)
        cols = torch.arange(length, device=self.device)
        mask = (cols.view(1, -1) <= pos).view(b, 1, 1, 1, length)
        if lora == "one":
            self.lora.route_one(self._one)
        elif lora == "rows":
            self.lora.route_rows(self._adapter[:b])
        try:
            hidden = self.dec.forward(ids, pos, write, mask, None, length)
        finally:
            self.lora.done()
        logits = self.dec.logits(hidden[:, -1])
        if sample == "host":
            if self._logits is None or self._logits.shape[1] != logits.shape[1]:
                raise RuntimeError("host-sampling buffer missing")
            self._logits[:b].copy_(logits)
            return
        tok = sample_on_device(logits, self._temp[:b], self._top_p[:b], self._seed[:b], self._step[:b],
                               greedy_only=sample == "greedy")
        self._out[:b].copy_(tok)
        # the next step's inputs, written by this step (padding rows stay at position 0)
        self._tokens[:b].copy_(tok)
        self._pos[:b].add_(self._live[:b])
        self._step[:b].add_(1)

    def gpu_step_ms(self) -> list[float]:
        """GPU milliseconds of each decode graph replayed since the last call (needs `timing`)."""
        torch.cuda.synchronize()
        out = [a.elapsed_time(b) for a, b in self._events]
        self._events = []
        return out

    def _drop_graphs(self) -> None:
        # a fresh pool too: the old one dies with its last graph, and capturing into a dead pool handle trips
        # an allocator assert (seen on an H200 with torch 2.11 after a new adapter grew the LoRA stacks)
        self._graphs.clear()
        self._pool = None

    def _graph(self, key: tuple[int, int, str, str]) -> Any:
        version = (self.lora.version, self.dec.capacity)
        if version != self._graph_version:
            self._drop_graphs()
            self._graph_version = version
        g = self._graphs.get(key)
        if g is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (cuBLAS workspaces, lazy inits) outside the capture
                self._body(*key)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._body(*key)
            self._graphs[key] = g
            self.captures += 1
            self._dirty = True  # the warm-up advanced the buffers
        return g

    def decode(self) -> list[tuple[Row, int]]:
        rows = self._decoding
        if not rows:
            return []
        t0 = time.perf_counter()
        n = len(rows)
        b = pick_bucket(self._buckets, n)
        length = pick_bucket(context_buckets(self.dec.capacity), max(r.length for r in rows) + 1)
        lora, sample = self._modes()
        if sample == "host" and (self._logits is None):
            vocab = self.dec.model.get_output_embeddings().weight.shape[0]
            self._logits = torch.zeros((self.max_rows, vocab), dtype=torch.float32, device=self.device)
        key = (b, length, lora, sample)
        if self._dirty:  # before a capture too: its warm-up step writes the cache where the buffers point
            self._upload()
        if self.graphs:
            graph = self._graph(key)
            if self._dirty:
                self._upload()
            if self.timing:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                self._events.append((start, end))
            else:
                graph.replay()
        else:
            self._body(*key)
        if sample == "host":
            tokens = sample_rows(self._logits[:n], [r.sampler for r in rows])
            self._dirty = True
        else:
            tokens = self._out[:n].tolist()  # the one device -> host sync of a step
        for r in rows:
            r.length += 1
        self.report("decode", n, len({r.adapter for r in rows}), time.perf_counter() - t0)
        return list(zip(rows, tokens))
