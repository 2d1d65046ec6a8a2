"""What every engine behind the model deployment shares: request and event types, and adapter bookkeeping.

An engine takes `GenRequest`s (token ids, sampling parameters, an adapter key, an `emit` callback) and calls
`emit` with `GenEvent`s as text arrives. Adapters are loaded under a key, pinned by the requests that use
them (`acquire`/`release`, and every queued request holds a reference), and evicted only once nothing
uses them. `fineray.serve.engine.Engine` (the built-in engine) and `fineray.serve._vllm.VllmEngine` (vLLM's
`AsyncLLM`) implement the engine-specific part: `_load`, `_enqueue`, `_collect`, `cancel`, `close`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fineray.serve.lora_stack import BASE
from fineray.serve.sampling import SamplingParams

__all__ = ["Completion", "EngineBase", "EngineError", "GenEvent", "GenRequest", "resolve_device"]


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


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device=cuda but no GPU is visible to this process")
    return torch.device(device)


class EngineBase:
    """Adapter references and request admission common to every engine (thread-safe)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._adapters: dict[str, _Adapter] = {}
        self._closed = False

    # hooks for the engine ------------------------------------------------------------------
    def _load(self, key: str, path: str, timeout: float | None) -> None:
        """Load adapter files under `key` (registers it in `self._adapters`)."""
        raise NotImplementedError

    def _enqueue(self, reqs: list[GenRequest]) -> None:
        """Queue validated requests (called with `self._cv` held)."""
        raise NotImplementedError

    def _check(self, req: GenRequest) -> EngineError | None:
        """An error when this engine cannot run `req` as asked (default: it can)."""
        return None

    def _collect(self) -> None:
        """Called (with `self._cv` held) when an evicted adapter may have lost its last reference."""
        self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters (any thread)
    def load_adapter(self, key: str, path: str | Path, timeout: float | None = None) -> None:
        """Load the PEFT adapter in `path` under `key` (no-op when loaded; cancels a pending eviction)."""
        with self._cv:
            st = self._adapters.get(key)
            if st is not None:
                st.evict = False
                return
        self._load(key, str(path), timeout)

    def unload_adapter(self, key: str) -> None:
        """Evict an adapter; the weights go once no queued or running row uses it."""
        with self._cv:
            if key in self._adapters:
                self._adapters[key].evict = True
                self._collect()

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
                self._collect()

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
                    if err is None:
                        err = self._check(r)
                errors.append(err)
                if err is not None:
                    continue
                for r in reqs:
                    if r.adapter != BASE:
                        self._adapters[r.adapter].refs += 1
                self._enqueue(reqs)
            self._cv.notify_all()
        return errors

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

