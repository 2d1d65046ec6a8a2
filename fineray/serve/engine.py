"""The generation engine: one base model, LoRA adapters by name, and a batched decode loop in one thread.

Rows of a batch may use different adapters (see `fineray.serve.adapters`). With continuous
(iteration-level) batching, new requests are prefilled together between decode steps and merged into the
running batch (see `fineray.serve.kvcache`). Models whose cache is not a plain dynamic KV cache (sliding-
window or linear-attention layers) fall back to static batching.

Everything that touches the model (forward passes, adapter loads and deletions) runs in the engine thread,
so an adapter is never deleted under a running forward pass; an adapter evicted while rows still use it is
deleted when the last of them finishes.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fineray.serve import kvcache
from fineray.serve.adapters import BASE, AdapterError, AdapterNotServable, LoraAdapters
from fineray.serve.sampling import RowSampler, SamplingParams, TextTracker, sample_rows

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


class EngineError(RuntimeError):
    """A request the engine cannot run (unknown adapter, engine closed)."""


@dataclass
class GenEvent:
    """Progress of one sequence: new text, tokens so far, and on the last event the finish reason."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    error: str | None = None
    token_ids: list[int] | None = None  # on the last event only


@dataclass
class GenRequest:
    """One sequence to generate. `emit` is called from the engine thread and must not block."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[GenEvent], None]
    adapter: str = BASE
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Completion:
    """Result of `Engine.generate`."""

    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: list[int]


@dataclass
class _Adapter:
    name: str  # the adapter's name in LoraAdapters
    path: str
    refs: int = 0
    evict: bool = False


class _Row:
    __slots__ = ("adapter", "done", "generated", "length", "next_token", "req", "sampler", "tracker")

    def __init__(self, req: GenRequest, sampler: RowSampler, tracker: TextTracker, adapter: str):
        self.req, self.sampler, self.tracker, self.adapter = req, sampler, tracker, adapter
        self.next_token, self.length, self.generated, self.done = 0, len(req.prompt_ids), 0, False


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device=cuda but no GPU is visible to this process")
    return torch.device(device)


class Engine:
    """A base model plus named LoRA adapters, generating for many requests at once.

    Args:
        base: base model spec (see `fineray.train.model.resolve_base`).
        device: `auto`, `cpu` or `cuda`. dtype: `auto` (bf16 on GPU, fp32 on CPU) or a torch dtype name.
        max_batch_size: most rows decoded together.
        continuous: admit new requests between decode steps (else only when the batch is empty).
        threads: torch intra-op threads (process-wide; set it to the CPUs the replica owns).
        on_step: called after every forward pass with (kind, rows, distinct adapters, seconds).
    """

    def __init__(self, base: str, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 continuous: bool = True, threads: int | None = None,
                 on_step: Callable[[str, int, int, float], None] | None = None):
        from fineray.train.config import ModelConfig
        from fineray.train.model import load_base_model, load_tokenizer, resolve_base

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        mcfg = ModelConfig(base=base, dtype=dtype)
        path = resolve_base(base)
        self.tokenizer = load_tokenizer(mcfg, path)
        model = load_base_model(mcfg, use_gpu=self.device.type == "cuda", path=path)
        model.to(self.device).eval()
        model.config.use_cache = True  # load_base_model turns it off for training
        self.model: Any = model
        self.lora = LoraAdapters(model, self.device, base)
        self.base = base
        self.vocab = model.get_output_embeddings().weight.shape[0]
        # transformers 5.x renames `past_key_values` to `cache` (the old name warns, and goes in 5.40)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch_size, self.continuous, self.on_step = max_batch_size, continuous, on_step
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()

        self._cv = threading.Condition()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._commands: list[tuple[Callable[[], Any], Future]] = []
        self._cancelled: set[str] = set()
        self._adapters: dict[str, _Adapter] = {}
        self._closed = False
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._plain_cache = True  # cleared when the model's cache layers cannot be merged/trimmed
        self._prefilling: list[_Row] = []
        self._step_s = 0.01  # moving average of a decode step (admission waits a few of them at most)
        self._thread = threading.Thread(target=self._loop, name="fineray-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ adapters (any thread)
    def load_adapter(self, key: str, path: str | Path, timeout: float | None = None) -> None:
        """Load the PEFT adapter in `path` under `key` (no-op when loaded; cancels a pending eviction)."""
        with self._cv:
            st = self._adapters.get(key)
            if st is not None:
                st.evict = False
                return
        self._call(lambda: self._do_load(key, str(path)), timeout)

    def unload_adapter(self, key: str) -> None:
        """Evict an adapter; the weights go once no queued or running row uses it."""
        with self._cv:
            if key in self._adapters:
                self._adapters[key].evict = True
                self._cv.notify_all()

    def acquire(self, key: str) -> None:
        """Pin an adapter (it stays loaded until `release`). Raises EngineError when it is not loaded."""
        if key == BASE:
            return
        with self._cv:
            st = self._adapters.get(key)
            if st is None:
                raise EngineError(f"adapter {key!r} is not loaded")
            st.refs += 1
            st.evict = False

    def release(self, key: str) -> None:
        if key == BASE:
            return
        with self._cv:
            st = self._adapters.get(key)
            if st is not None:
                st.refs -= 1
                self._cv.notify_all()

    def loaded_adapters(self) -> list[str]:
        with self._cv:
            return [k for k, v in self._adapters.items() if not v.evict]

    # ------------------------------------------------------------------ requests (any thread)
    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests; a list submitted together is prefilled in one forward pass when it fits."""
        err = self.submit_groups([reqs])[0]
        if err is not None:
            raise err

    def submit_groups(self, groups: list[list[GenRequest]]) -> list[EngineError | None]:
        """Queue several groups at once (all-or-nothing per group); returns each group's error or None."""
        errors: list[EngineError | None] = []
        with self._cv:
            for reqs in groups:
                err = None
                if self._closed:
                    err = EngineError("engine is closed")
                for r in reqs:
                    if err is None and r.adapter != BASE and r.adapter not in self._adapters:
                        err = EngineError(f"adapter {r.adapter!r} is not loaded")
                    if err is None and not r.prompt_ids:
                        err = EngineError("empty prompt")
                errors.append(err)
                if err is not None:
                    continue
                for r in reqs:
                    if r.adapter != BASE:
                        self._adapters[r.adapter].refs += 1
                    self._pending.append(r)
            self._cv.notify_all()
        return errors

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request (a client that went away)."""
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify_all()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str] | None = None, timeout: float | None = None) -> list[Completion]:
        """Blocking helper: generate for every prompt (one group) and return the completions in order."""
        n = len(prompts)
        plist = params if isinstance(params, list) else [params] * n
        names = adapters or [BASE] * n
        done = [threading.Event() for _ in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        final: list[GenEvent | None] = [None] * n

        def emitter(i: int) -> Callable[[GenEvent], None]:
            def emit(ev: GenEvent) -> None:
                texts[i].append(ev.text)
                if ev.finish_reason or ev.error:
                    final[i] = ev
                    done[i].set()
            return emit

        self.submit([GenRequest(list(p), sp, emitter(i), a) for i, (p, sp, a) in enumerate(zip(prompts, plist, names))])
        out = []
        for i in range(n):
            if not done[i].wait(timeout):
                raise TimeoutError("generation timed out")
            ev = final[i]
            assert ev is not None
            if ev.error:
                raise EngineError(ev.error)
            out.append(Completion("".join(texts[i]), ev.finish_reason or "stop", ev.tokens, ev.token_ids or []))
        return out

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
                while not (self._commands or self._pending or self._rows or self._closed or self._cancelled
                           or any(v.evict and v.refs <= 0 for v in self._adapters.values())):
                    self._cv.wait()
                if self._closed:
                    break
                commands, self._commands = self._commands, []
                cancelled, self._cancelled = self._cancelled, set()
                pending = [r for r in self._pending if r.request_id in cancelled]
                for r in pending:
                    self._pending.remove(r)
                new: list[GenRequest] = []
                if self._admit_now():
                    while self._pending and len(self._rows) + len(new) < self.max_batch_size:
                        new.append(self._pending.popleft())
            for r in pending:
                self._finish_req(r, GenEvent(finish_reason="cancelled"))
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - reported to the caller
                    fut.set_exception(e)
            if cancelled and self._rows:
                for row in self._rows:
                    if row.req.request_id in cancelled:
                        self._finish(row, "cancelled", "")
                self._drop_finished()
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    if self._rows:
                        self._step()
            except Exception as e:
                log.exception("generation failed")
                for row in self._rows + self._prefilling:
                    if not row.done:
                        row.done = True
                        self._finish_req(row.req, GenEvent(error=f"{type(e).__name__}: {e}"))
                self._rows, self._cache, self._mask = [], None, None
            self._prefilling = []
            self._collect_adapters()
        for r in list(self._pending) + [row.req for row in self._rows if not row.done]:
            self._finish_req(r, GenEvent(error="engine is shutting down"))

    def _admit_now(self) -> bool:
        """Whether queued requests join now (caller holds the lock).

        Joining a running batch copies its whole KV cache (pad + concatenate), so with a batch running the
        engine waits until a quarter of the free rows can be filled at once, or the oldest request has waited
        a few decode steps: the copy is amortised and no request waits long.
        """
        if not self._pending:
            return False
        if not self._rows:
            return True
        if not (self.continuous and self._plain_cache):
            return False
        free = self.max_batch_size - len(self._rows)
        waited = time.monotonic() - self._pending[0].queued_at
        return free > 0 and (len(self._pending) >= max(1, free // 4) or waited > 4 * self._step_s)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 rows: list[_Row], kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        self.lora.select([r.adapter for r in rows])
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
        finally:
            self.lora.done()
        logits = out.logits[:, -1, :]
        if self.on_step is not None:
            self.on_step(kind, len(rows), len({r.req.adapter for r in rows}), time.perf_counter() - t0)
        return logits

    def _new_row(self, req: GenRequest) -> _Row:
        return _Row(req, RowSampler(req.params, self.vocab, self.device, self._gen),
                    TextTracker(self.tokenizer, req.params.stop), req.adapter)

    def _prefill(self, reqs: list[GenRequest]) -> None:
        from transformers import DynamicCache

        rows = self._prefilling = [self._new_row(r) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, rows, "prefill")
        self._plain_cache = self._plain_cache and kvcache.is_plain(cache)
        keep = self._advance(rows, sample_rows(logits, [r.sampler for r in rows]))
        if not keep:
            return
        if len(keep) < len(rows) and self._plain_cache:
            mask, rows = kvcache.select_rows(cache, mask, keep), [rows[i] for i in keep]
        self._merge(cache, mask, rows)

    def _merge(self, cache: Any, mask: torch.Tensor, rows: list[_Row]) -> None:
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, rows
            self._trim()
            return
        assert self._mask is not None
        self._mask = kvcache.join(self._cache, self._mask, cache, mask)
        self._rows = self._rows + rows

    def _step(self) -> None:
        rows = self._rows
        assert self._mask is not None
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        pos = torch.tensor([[r.length] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype,
                                                       device=self.device)], dim=1)
        t0 = time.perf_counter()
        logits = self._forward(ids, self._mask, pos, self._cache, rows, "decode")
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t0)  # moving average
        live = [r for r in rows if not r.done]
        for r in rows:
            r.length += 1
        tokens = sample_rows(logits, [r.sampler for r in rows])
        self._advance(live, [tokens[i] for i, r in enumerate(rows) if not r.done])
        self._drop_finished()

    def _advance(self, rows: list[_Row], tokens: list[int]) -> list[int]:
        """Record one sampled token per row; emit text; return the indices of rows still running."""
        keep = []
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            row.generated += 1
            row.sampler.observe(tok)
            if tok in self.eos_ids:
                self._finish(row, "stop", "", eos=tok)
                continue
            delta, stopped = row.tracker.add(tok)
            if stopped:
                self._finish(row, "stop", delta)
            elif row.generated >= row.req.params.max_tokens or row.length + 1 >= self.max_context:
                self._finish(row, "length", delta)
            else:
                if delta:
                    row.req.emit(GenEvent(text=delta, tokens=row.generated))
                row.next_token = tok
                keep.append(i)
        return keep

    def _finish(self, row: _Row, reason: str, delta: str, eos: int | None = None) -> None:
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

    def _drop_finished(self) -> None:
        if not self._plain_cache:  # cannot shrink this cache: finished rows ride along until all are done
            if all(r.done for r in self._rows):
                self._rows, self._cache, self._mask = [], None, None
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        self._mask = kvcache.select_rows(self._cache, self._mask, keep)
        self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        assert self._mask is not None
        if self._plain_cache:
            self._mask = kvcache.trim(self._cache, self._mask)
