"""The generation engine: one base model, LoRA adapters by name, and a batched decode loop in one thread.

Rows of a batch may use different adapters (see `fineray.serve.lora_stack`). With continuous (iteration-level)
batching, new requests join the running batch between decode steps. Two batch kinds run the model
(`fineray.serve._batch`): on a GPU, Llama-family models use fixed KV slots with decode steps replayed as
CUDA graphs (`fineray.serve._static`); other models, and the CPU by default, use a growing transformers
`DynamicCache` (`fineray.serve._dynamic`). `cache="static"|"dynamic"` picks one explicitly.

Everything that touches the model (forward passes, adapter loads and deletions) runs in the engine thread,
so an adapter is never deleted under a running forward pass; an adapter evicted while rows still use it is
deleted when the last of them finishes.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from fineray.serve._batch import Batch, Row
from fineray.serve._engine_base import (
    Completion,
    EngineBase,
    EngineError,
    GenEvent,
    GenRequest,
    _Adapter,
    resolve_device,
)
from fineray.serve.lora_stack import BASE, AdapterError, AdapterNotServable, LoraAdapters
from fineray.serve.sampling import RowSampler, TextTracker

__all__ = [
    "BASE",
    "AdapterError",
    "AdapterNotServable",
    "Completion",
    "Engine",
    "EngineError",
    "GenEvent",
    "GenRequest",
    "resolve_device",
]

log = logging.getLogger(__name__)


class Engine(EngineBase):
    """A base model plus named LoRA adapters, generating for many requests at once.

    Args:
        base: base model spec (see `fineray.train.model.resolve_base`).
        device: `auto`, `cpu` or `cuda`. dtype: `auto` (bf16 on GPU, fp32 on CPU) or a torch dtype name.
        max_batch_size: most rows decoded together.
        continuous: admit new requests between decode steps (else only when the batch is empty).
        threads: torch intra-op threads (process-wide; set it to the CPUs the replica owns).
        on_step: called after every forward pass with (kind, rows, distinct adapters, seconds).
        cache: `auto` (static slots + CUDA graphs on a GPU for Llama-family models, else dynamic), `static`
            or `dynamic`.
        cuda_graphs: replay decode steps as CUDA graphs (static cache on a GPU only).
        prefill_tokens: prompt tokens prefilled per iteration by the static cache (chunked prefill).
        model, tokenizer: an already loaded HF model (moved to `device`) and its tokenizer, instead of
            loading `base` (`base` then only names it). Used by in-process rollouts and benchmarks.
    """

    def __init__(self, base: str, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 continuous: bool = True, threads: int | None = None,
                 on_step: Callable[[str, int, int, float], None] | None = None, cache: str = "auto",
                 cuda_graphs: bool = True, prefill_tokens: int | None = None, model: Any = None,
                 tokenizer: Any = None):
        from fineray.serve._decoder import supports
        from fineray.train.config import ModelConfig
        from fineray.train.model import load_base_model, load_tokenizer, resolve_base

        if threads:
            torch.set_num_threads(threads)
        if cache not in ("auto", "static", "dynamic"):
            raise EngineError(f"cache must be auto, static or dynamic, not {cache!r}")
        self.device = resolve_device(device)
        if model is None:
            mcfg = ModelConfig(base=base, dtype=dtype)
            path = resolve_base(base)
            tokenizer = load_tokenizer(mcfg, path)
            model = load_base_model(mcfg, use_gpu=self.device.type == "cuda", path=path)
        if tokenizer is None:
            raise EngineError("an Engine given a model needs its tokenizer too")
        self.tokenizer = tokenizer
        model.to(self.device).eval()
        model.config.use_cache = True  # load_base_model turns it off for training
        self.model: Any = model
        self.lora = LoraAdapters(model, self.device, base)
        self.base = base
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch_size, self.continuous, self.on_step = max_batch_size, continuous, on_step
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()

        why_not = supports(model)
        if cache == "auto":
            cache = "static" if self.device.type == "cuda" and why_not is None else "dynamic"
        elif cache == "static" and why_not is not None:
            raise EngineError(f"cache=static needs a Llama-family model: {why_not}")
        self.cache = cache
        self.batch: Batch
        if cache == "static":
            from fineray.serve._static import StaticBatch

            gpu = self.device.type == "cuda"
            self.batch = StaticBatch(model, self.lora, self.device, max_rows=max_batch_size, report=self._report,
                                     capacity=1024 if gpu else 256, graphs=cuda_graphs,
                                     prefill_tokens=prefill_tokens or (2048 if gpu else 512),
                                     rng=random.Random(int(torch.randint(0, 1 << 62, (1,)))))
        else:
            from fineray.serve._dynamic import DynamicBatch

            self.batch = DynamicBatch(model, self.lora, self.device, max_rows=max_batch_size, pad_id=self.pad_id,
                                      continuous=continuous, report=self._report)
        log.info("engine: %s cache on %s%s", cache, self.device,
                 "" if cache == "static" or why_not is None else f" ({why_not})")

        super().__init__()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._commands: list[tuple[Callable[[], Any], Future]] = []
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="fineray-engine", daemon=True)
        self._thread.start()

    def _report(self, kind: str, rows: int, adapters: int, seconds: float) -> None:
        if self.on_step is not None:
            self.on_step(kind, rows, adapters, seconds)

    def _load(self, key: str, path: str, timeout: float | None) -> None:
        self._call(lambda: self._do_load(key, path), timeout)

    def _check(self, req: GenRequest) -> EngineError | None:
        fmt = req.params.response_format
        if fmt and fmt.get("type") not in (None, "text"):
            return EngineError("structured output (response_format json_schema / json_object) needs the vLLM engine "
                               "(serve.engine: vllm)")
        return None

    def _enqueue(self, reqs: list[GenRequest]) -> None:
        self._pending.extend(reqs)

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request (a client that went away)."""
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the engine thread; queued requests get an error event."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread
    def _call(self, fn: Callable[[], Any], timeout: float | None) -> Any:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise EngineError("engine is closed")
            self._commands.append((fn, fut))
            self._cv.notify_all()
        return fut.result(timeout)

    def _do_load(self, key: str, path: str) -> None:
        if key in self._adapters:
            self._adapters[key].evict = False
            return
        name = self.lora.load(key, path)
        with self._cv:
            self._adapters[key] = _Adapter(name, path)

    def _collect_adapters(self) -> None:
        with self._cv:
            gone = [k for k, v in self._adapters.items() if v.evict and v.refs <= 0]
            for k in gone:
                st = self._adapters.pop(k)
                self.lora.delete(st.name)
        if gone:
            log.info("unloaded adapters %s", gone)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._pending or self.batch.rows() or self._closed or self._cancelled
                           or any(v.evict and v.refs <= 0 for v in self._adapters.values())):
                    self._cv.wait()
                if self._closed:
                    break
                commands, self._commands = self._commands, []
                cancelled, self._cancelled = self._cancelled, set()
                dropped = [r for r in self._pending if r.request_id in cancelled]
                for r in dropped:
                    self._pending.remove(r)
                new: list[GenRequest] = []
                if self._pending:
                    take = self.batch.room(len(self._pending), time.monotonic() - self._pending[0].queued_at)
                    if not self.continuous and self.batch.rows():
                        take = 0
                    new = [self._pending.popleft() for _ in range(take)]
            for r in dropped:
                self._finish_req(r, GenEvent(finish_reason="cancelled"))
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    fut.set_exception(e)
            try:
                if cancelled:
                    gone = [row for row in self.batch.rows() if row.req.request_id in cancelled]
                    for row in gone:
                        self._finish(row, "cancelled", "")
                    self.batch.remove(gone)
                with torch.inference_mode():
                    if new:
                        self.batch.admit([self._new_row(r) for r in new])
                    self._advance(self.batch.prefill())
                    self._advance(self.batch.decode())
            except Exception as e:
                log.exception("generation failed")
                for row in self.batch.rows():
                    if not row.done:
                        row.done = True
                        self._finish_req(row.req, GenEvent(error=f"{type(e).__name__}: {e}"))
                self.batch.clear()
            self._collect_adapters()
        for r in list(self._pending) + [row.req for row in self.batch.rows() if not row.done]:
            self._finish_req(r, GenEvent(error="engine is shutting down"))

    def _new_row(self, req: GenRequest) -> Row:
        return Row(req, RowSampler(req.params, self.vocab, self.device, self._gen),
                   TextTracker(self.tokenizer, req.params.stop), req.adapter)

    def _advance(self, pairs: list[tuple[Row, int]]) -> None:
        """Record one sampled token per row; emit text; hand finished rows back to the batch."""
        finished = []
        for row, tok in pairs:
            row.generated += 1
            row.sampler.observe(tok)
            if tok in self.eos_ids and not row.req.params.ignore_eos:
                self._finish(row, "stop", "", eos=tok)
            else:
                delta, stopped = row.tracker.add(tok)
                if stopped:
                    self._finish(row, "stop", delta)
                elif row.generated >= row.req.params.max_tokens or row.length + 1 >= self.max_context:
                    self._finish(row, "length", delta)
                else:
                    if delta:
                        row.req.emit(GenEvent(text=delta, tokens=row.generated))
                    row.next_token = tok
                    continue
            finished.append(row)
        if finished:
            self.batch.remove(finished)

    def _finish(self, row: Row, reason: str, delta: str, eos: int | None = None) -> None:
        row.done = True
        text = delta + row.tracker.flush() if reason != "cancelled" else ""
        ids = row.tracker.ids + ([eos] if eos is not None else [])
        self._finish_req(row.req, GenEvent(text=text, tokens=row.generated, finish_reason=reason, token_ids=ids))

    def _finish_req(self, req: GenRequest, ev: GenEvent) -> None:
        try:
            req.emit(ev)
        except Exception:
            log.debug("emit failed", exc_info=True)
        self.release(req.adapter)
