"""Ray Serve application: an OpenAI ingress, the model deployment, and a metrics hub.

    HTTP -> OpenAIIngress (FastAPI: auth, validation, routing, SSE)
              -> ModelServer (base model + multiplexed LoRA adapters, batched generation)
              -> MetricsHub  (one Prometheus registry for every replica)

`build_app(args)` is the import path for a KubeRay RayService (`serveConfigV2`):

    applications:
      - name: fineray
        route_prefix: /
        import_path: fineray.serve.app:build_app
        args: {registry: "s3://bucket/adapters", base: "embedded:smollm2-135m-instruct", config: /etc/fineray/serve.yaml}

Mixed-adapter batching: `@serve.batch` groups concurrent requests into one admission (one prefill forward
pass), and the engine's iteration-level batching shares every decode step between all running requests,
whatever their adapters. Ray Serve 2.60's `@serve.batch` splits a batch by multiplexed model id, so the
model deployment clears the id from the request context just for the batched admission call (it has
already used the id to load the adapter). If that private context API changes, admissions fall back to
one group per adapter; decode steps are still shared.
"""

# No `from __future__ import annotations` here: FastAPI must see real `Request` annotations on the ingress
# methods (Serve re-creates them, so string annotations would no longer resolve and become query params).
import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fineray.serve.config import ServeConfig, load_serve_config, resolve_engine, serve_config_from_dict
from fineray.serve.messages import ChoiceText, GenerationError, GenerationJob
from fineray.serve.metrics import EventBuffer, ServeMetrics
from fineray.serve.protocol import error_body

__all__ = [
    "APP_NAME",
    "MODEL_DEPLOYMENT",
    "MetricsHub",
    "ModelServer",
    "OpenAIIngress",
    "build_app",
    "build_application",
]

log = logging.getLogger(__name__)
APP_NAME = "fineray"
MODEL_DEPLOYMENT = "FinerayServer"  # k8s/base/rayservice.yaml overrides its autoscaling by this name


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, num_replicas=1)
class MetricsHub:
    """Owns the Prometheus registry; replicas push event batches, `/metrics` renders it."""

    def __init__(self) -> None:
        self.metrics = ServeMetrics()

    def record(self, events: list[dict[str, Any]]) -> None:
        self.metrics.apply(events)

    def render(self) -> bytes:
        return self.metrics.render()


class _AdapterLease:
    """What `@serve.multiplexed` caches per adapter; its `__del__` (called on LRU eviction) unloads it."""

    def __init__(self, server: "ModelServer", key: str):
        self.server, self.key, self.gone = server, key, False

    def __del__(self) -> None:
        if self.gone:  # Serve calls __del__ on eviction, and Python again at garbage collection
            return
        self.gone = True
        with contextlib.suppress(Exception):  # at interpreter shutdown the engine may be gone
            self.server.engine.unload_adapter(self.key)
            self.server.buffer.add({"event": "evict", **_labels(self.key)})


def _labels(ref: str) -> dict[str, str]:
    name, _, ver = ref.partition("@")
    return {"adapter": name, "version": ver}


def _without_model_id() -> Any:
    try:
        from ray.serve import context as sctx

        cur = sctx._get_serve_request_context()
        return sctx._serve_request_context.set(dataclasses.replace(cur, multiplexed_model_id=""))
    except Exception:  # noqa: BLE001 - private API moved: batches stay per-adapter
        return None


def _restore(token: Any) -> None:
    if token is not None:
        from ray.serve import context as sctx

        sctx._serve_request_context.reset(token)


@serve.deployment(name=MODEL_DEPLOYMENT)
class ModelServer:
    """One base model per replica; adapters loaded on demand (LRU) and batched together."""

    def __init__(self, cfg_dict: dict[str, Any], hub: Any):
        from fineray.serve.engine import Engine
        from fineray.train.registry import AdapterRegistry

        cfg = serve_config_from_dict(cfg_dict)
        threads = cfg.threads_per_replica or max(1, int(cfg.num_cpus_per_replica))
        self.buffer = EventBuffer()
        if cfg.engine == "vllm":
            from fineray.serve._vllm import VllmEngine

            v = cfg.vllm
            self.engine = VllmEngine(cfg.base, device=cfg.device, dtype=cfg.dtype,
                                     max_batch_size=cfg.batching.max_batch_size,
                                     max_loras=v.max_loras or cfg.max_adapters_per_replica, max_lora_rank=v.max_lora_rank,
                                     max_model_len=v.max_model_len, tensor_parallel_size=v.tensor_parallel_size,
                                     gpu_memory_utilization=v.gpu_memory_utilization, cpu_kv_cache_gb=v.cpu_kv_cache_gb,
                                     enable_prefix_caching=v.enable_prefix_caching, engine_args=v.engine_args,
                                     threads=threads)
        else:
            b = cfg.builtin
            self.engine = Engine(cfg.base, device=cfg.device, dtype=cfg.dtype,
                                 max_batch_size=cfg.batching.max_batch_size, continuous=cfg.batching.continuous,
                                 threads=threads, on_step=self.buffer.step, cache=b.cache, cuda_graphs=b.cuda_graphs,
                                 prefill_tokens=b.prefill_tokens)
        self.registry = AdapterRegistry(cfg.registry)
        self.hub = hub
        self._flusher: asyncio.Task | None = None

        async def load_adapter(model_id: str) -> _AdapterLease:  # a function: Serve stores its LRU state on it
            return await self._load(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)
        self._admit.set_max_batch_size(cfg.batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        log.info("model replica ready: engine=%s base=%s device=%s threads=%d", cfg.engine, cfg.base,
                 self.engine.device, threads)

    async def _load(self, model_id: str) -> _AdapterLease:
        t0 = time.perf_counter()
        path = await asyncio.to_thread(self.registry.local_path, model_id)
        await asyncio.to_thread(self.engine.load_adapter, model_id, path)
        self.buffer.add({"event": "load", **_labels(model_id), "seconds": time.perf_counter() - t0})
        return _AdapterLease(self, model_id)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _admit(self, groups: list[list[Any]]) -> list[str | None]:
        # One call per admission group: requests of different adapters are prefilled in one forward pass.
        return [None if e is None else str(e) for e in self.engine.submit_groups(groups)]

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            events = self.buffer.drain()
            if events:
                try:
                    await self.hub.record.remote(events)
                except Exception:
                    log.warning("metrics hub unreachable", exc_info=True)

    async def _start(self, job: GenerationJob, queue: asyncio.Queue) -> tuple[list[Any], GenerationError | None]:
        """Load the adapter, queue one engine request per choice; return (requests, error)."""
        from fineray.serve.engine import BASE, AdapterNotServable, GenRequest
        from fineray.train.registry import RegistryError

        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        model_id = serve.get_multiplexed_model_id()
        key = model_id or BASE
        try:
            if model_id:
                await self.get_adapter(model_id)
                self.engine.acquire(key)  # pinned until admitted, so an eviction cannot slip in between
        except RegistryError as e:
            return [], GenerationError(404, str(e), "model_not_found", "invalid_request_error", "model")
        except AdapterNotServable as e:
            return [], GenerationError(400, str(e), "adapter_not_servable", "invalid_request_error", "model")
        except Exception as e:
            log.exception("adapter %s failed to load", model_id)
            return [], GenerationError(500, f"adapter `{model_id}` could not be loaded: {e}", "adapter_load_failed")
        loop = asyncio.get_running_loop()
        reqs = []
        try:
            base = job.params
            for prompt in job.prompts:
                for j in range(job.n):
                    params = dataclasses.replace(base, seed=None if base.seed is None else base.seed + j)
                    idx = len(reqs)
                    reqs.append(GenRequest(prompt, params, lambda ev, i=idx: loop.call_soon_threadsafe(
                        queue.put_nowait, (i, ev)), key))
            token = _without_model_id()
            try:
                error = await self._admit(reqs)
            finally:
                _restore(token)
        finally:
            if model_id:
                self.engine.release(key)
        if error:
            return [], GenerationError(503, f"the model replica cannot take the request: {error}", "unavailable")
        return reqs, None

    def _cancel(self, reqs: list[Any], finished: set[int]) -> None:
        for i, r in enumerate(reqs):
            if i not in finished:
                self.engine.cancel(r.request_id)

    @staticmethod
    def _failed(error: str) -> GenerationError:
        return GenerationError(500, f"generation failed: {error}", "generation_failed")

    async def generate(self, job: GenerationJob) -> list[ChoiceText] | GenerationError:
        """Non-streaming generation: every choice's text, finish reason and completion tokens."""
        queue: asyncio.Queue = asyncio.Queue()
        reqs, error = await self._start(job, queue)
        if error:
            return error
        texts: dict[int, list[str]] = defaultdict(list)
        done: dict[int, Any] = {}
        try:
            while len(done) < len(reqs):
                i, ev = await queue.get()
                if ev.error:
                    return self._failed(ev.error)
                texts[i].append(ev.text)
                if ev.finish_reason:
                    done[i] = ev
        finally:
            self._cancel(reqs, set(done))
        return [ChoiceText(i, "".join(texts[i]), done[i].finish_reason, done[i].tokens) for i in range(len(reqs))]

    async def stream(self, job: GenerationJob) -> AsyncIterator[list[ChoiceText] | GenerationError]:
        """Streaming generation: first `[]` once admitted (or the error), then lists of text pieces; a failure
        during generation ends the stream with its error."""
        queue: asyncio.Queue = asyncio.Queue()
        reqs, error = await self._start(job, queue)
        if error:
            yield error
            return
        yield []
        done: set[int] = set()
        try:
            while len(done) < len(reqs):
                items = [await queue.get()]
                while not queue.empty():  # coalesce what arrived meanwhile into one list
                    items.append(queue.get_nowait())
                out = []
                for i, ev in items:
                    if ev.error:
                        if out:
                            yield out
                        yield self._failed(ev.error)
                        return
                    out.append(ChoiceText(i, ev.text, ev.finish_reason, ev.tokens))
                    if ev.finish_reason:
                        done.add(i)
                yield out
        finally:
            self._cancel(reqs, done)

    def ping(self) -> dict[str, Any]:
        return {"device": str(self.engine.device), "engine": type(self.engine).__name__,
                "adapters": self.engine.loaded_adapters()}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


fastapi_app = FastAPI(title="fineray", docs_url=None, redoc_url=None, openapi_url=None)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", code=code),
                        status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(f"The server had an error processing your request ({type(exc).__name__}).",
                                   "server_error", code="internal_error"), status_code=500)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """The HTTP front: see `fineray.serve.api.ApiService`."""

    def __init__(self, cfg_dict: dict[str, Any], source: tuple[str | None, dict[str, Any]], model: Any, hub: Any,
                 reqlog: Any = None):
        from fineray.serve.api import ApiService

        self.api = ApiService(cfg_dict, source, model, hub, reqlog)

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self.api.models(request)

    @fastapi_app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> Response:
        return await self.api.models(request, model_id)

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self.api.chat(request)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.api.completions(request)

    @fastapi_app.post("/v1/feedback")
    async def feedback(self, request: Request) -> Response:
        return await self.api.feedback(request)

    @fastapi_app.get("/metrics")
    async def metrics(self) -> Response:
        return await self.api.metrics()

    @fastapi_app.get("/healthz")
    async def healthz(self) -> Response:
        return await self.api.health()


def _gpus(cfg: ServeConfig) -> float:
    if cfg.num_gpus_per_replica is not None:
        return cfg.num_gpus_per_replica
    if cfg.engine == "vllm" and cfg.vllm.tensor_parallel_size > 1:
        return cfg.vllm.tensor_parallel_size
    if cfg.device == "cuda":
        return 1
    if cfg.device == "auto":
        try:
            import ray

            return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
        except Exception:  # noqa: BLE001
            return 0
    return 0


def build_application(cfg: ServeConfig) -> Any:
    """The Serve application graph for a config (deployment options from batching/autoscaling)."""
    cfg = resolve_engine(cfg)  # replicas and ingress see the engine decided here, never `auto`
    b, a = cfg.batching, cfg.autoscaling
    model_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus_per_replica, "num_gpus": _gpus(cfg)},
        "max_ongoing_requests": b.max_ongoing_requests or 2 * b.max_batch_size,
        "max_queued_requests": b.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    # Always an autoscaling config (min == max is a fixed count): a RayService's serveConfigV2 may then
    # override it per deployment without clashing with a code-set num_replicas.
    model_opts["autoscaling_config"] = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": max(1, a.min_replicas), "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
    }
    cfg_dict = cfg.to_dict()
    hub = MetricsHub.bind()
    model = ModelServer.options(**model_opts).bind(cfg_dict, hub)
    extra = []
    if cfg.log_requests:  # opt-in request log + feedback (fineray.serve.requestlog)
        from fineray.base.storage import is_remote
        from fineray.serve.requestlog import RequestLog

        uri = cfg.log_requests if is_remote(cfg.log_requests) else str(Path(cfg.log_requests).expanduser().resolve())
        extra.append(RequestLog.bind(uri, cfg.log_flush_s))
    return OpenAIIngress.options(num_replicas=cfg.ingress_replicas,
                                 graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s).bind(
        cfg_dict, cfg.source, model, hub, *extra)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Application builder for `serve run` / KubeRay `serveConfigV2` (`import_path: fineray.serve.app:build_app`).

    Args:
        args: `config` (a serve YAML path readable on the cluster) plus overrides such as `registry`, `base`,
            or dotted keys (`batching.max_batch_size`). HTTP host/port come from Serve's `http_options`.
    """
    args = dict(args or {})
    config = args.pop("config", None)
    return build_application(load_serve_config(config, args))
