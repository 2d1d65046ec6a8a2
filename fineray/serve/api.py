"""The OpenAI-compatible HTTP API (run inside the ingress deployment): auth, validation, routing, SSE.

The ingress does everything that needs no model weights: API keys, request parsing and limits, resolving
`model` (base / adapter / `name@vN` / rollout), the chat template and tokenisation (so prompt limits and
`usage` are exact), and the wire format. Generation is delegated to the model deployment through a
handle with `multiplexed_model_id=<adapter ref>`, which routes to replicas that already hold the adapter.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fineray.serve.auth import KeyStore, Principal
from fineray.serve.config import load_serve_config, serve_config_from_dict
from fineray.serve.messages import ChoiceText, GenerationError, GenerationJob
from fineray.serve.metrics import CONTENT_TYPE, EventBuffer, request_event
from fineray.serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_request,
    sse,
    usage,
)
from fineray.serve.router import ModelCatalog, Target
from fineray.train.config import ConfigError

__all__ = ["LOOPBACK", "ApiService", "refuse_remote"]

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_Req = TypeVar("_Req", ChatCompletionRequest, CompletionRequest)


def refuse_remote(keys_enabled: bool, insecure_no_auth: bool, client_host: str | None) -> bool:
    """Without API keys only loopback clients are served (unless `insecure_no_auth`)."""
    if keys_enabled or insecure_no_auth:
        return False
    return bool(client_host) and client_host not in LOOPBACK


class _Call:
    """Bookkeeping of one HTTP request for metrics."""

    def __init__(self, endpoint: str):
        self.endpoint, self.t0 = endpoint, time.perf_counter()
        self.target: Target | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft: float | None = None
        self.log_input: tuple[str, list[dict[str, str]] | None, str | None] | None = None  # key_id, messages, prompt

    def event(self, status: int, code: str | None = None) -> dict[str, Any]:
        t = self.target
        extra: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                 "latency_s": time.perf_counter() - self.t0, "ttft_s": self.ttft, "code": code}
        if t is not None and t.rollout:
            extra.update(rollout=t.rollout, variant=t.label)
        return request_event(t.name if t else "-", t.version if t else None, self.endpoint, status, **extra)


def _endpoint(name: str) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]:
    """An endpoint method gets its metrics bookkeeping (`_Call(name)`) first; an `APIError` it raises becomes the
    OpenAI error response (and a metrics event)."""

    def wrap(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        @functools.wraps(fn)
        async def endpoint(self: ApiService, request: Request, *args: Any) -> Response:
            call = _Call(name)
            try:
                return await fn(self, call, request, *args)
            except APIError as e:
                return self._error(call, e)

        return endpoint

    return wrap


class ApiService:
    """Request handling of the ingress; `model` and `hub` are Serve deployment handles."""

    def __init__(self, cfg_dict: dict[str, Any], source: tuple[str | None, dict[str, Any]], model: Any, hub: Any,
                 reqlog: Any = None):
        from transformers import AutoConfig

        from fineray.train.config import ModelConfig
        from fineray.train.model import load_tokenizer, resolve_base

        self.cfg = serve_config_from_dict(cfg_dict)
        self.source = source
        self.keys = KeyStore(self.cfg)
        self.catalog = ModelCatalog(self.cfg.registry, self.cfg.base, ttl_s=self.cfg.registry_ttl_s)
        path = resolve_base(self.cfg.base)
        self.tokenizer = load_tokenizer(ModelConfig(base=self.cfg.base), path)
        self.max_context = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 0) or 4096)
        self.vocab = len(self.tokenizer)
        self.model, self.hub = model, hub
        self.reqlog = None
        if reqlog is not None:  # `log_requests`: responses logged (redacted), feedback accepted
            from fineray.serve.requestlog import LogClient

            self.reqlog = LogClient(reqlog)
        self.buffer = EventBuffer()
        self._checked = time.monotonic()
        self._mtime = self._source_mtime()
        self._flusher: asyncio.Task | None = None
        self.fingerprint = "fineray"

    # ------------------------------------------------------------------ plumbing
    def _source_mtime(self) -> float | None:
        import os

        path = self.source[0]
        try:
            return os.stat(path).st_mtime if path else None
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        """Re-read rollouts, limits and keys when the config file (or key file) changed."""
        now = time.monotonic()
        if now - self._checked < self.cfg.reload_interval_s:
            return
        self._checked = now
        mtime = self._source_mtime()
        if mtime is not None and mtime != self._mtime:
            self._mtime = mtime
            try:
                new = load_serve_config(self.source[0], self.source[1])
                self.cfg = self.cfg.model_copy(update={"rollouts": new.rollouts, "limits": new.limits,
                                                       "keys": new.keys, "api_keys_file": new.api_keys_file})
                log.info("serve config reloaded: rollouts %s", {k: [(v.adapter, v.weight) for v in vs]
                                                                for k, vs in new.rollouts.items()})
            except ConfigError:
                log.exception("serve config %s is invalid; keeping the previous settings", self.source[0])
        self.keys.maybe_reload(self.cfg)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.flush()

    async def flush(self) -> None:
        """Send buffered metric events to the hub."""
        events = self.buffer.drain()
        if events:
            try:
                await self.hub.record.remote(events)
            except Exception:
                log.warning("metrics hub unreachable; dropped %d events", len(events), exc_info=True)

    def _principal(self, request: Request) -> Principal:
        self._maybe_reload()
        self._start_flusher()
        host = request.client.host if request.client else None
        if refuse_remote(self.keys.enabled, self.cfg.insecure_no_auth, host):  # defence in depth behind bind_host
            raise APIError(403, "This server has no API keys configured and only answers loopback clients.",
                           type="permission_error", code="unauthenticated_remote")
        return self.keys.authenticate(request.headers.get("authorization"))

    async def _json(self, request: Request) -> Any:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"Request body too large: {declared} bytes (limit {limit}).",
                           code="request_too_large")
        body = await request.body()
        if len(body) > limit:
            raise APIError(413, f"Request body too large: {len(body)} bytes (limit {limit}).",
                           code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).",
                           code="invalid_json") from None

    async def _parse(self, call: _Call, request: Request, cls: type[_Req]) -> tuple[Principal, _Req]:
        """Authenticate, parse and validate the body as `cls`, and resolve `model` (the adapter version, or the
        base, that answers this caller; rollouts included) into `call.target`."""
        principal = self._principal(request)
        req = parse_request(cls, await self._json(request))
        call.target = await asyncio.to_thread(self.catalog.resolve, req.model, principal, self.cfg.rollouts, req.user)
        return principal, req

    def _error(self, call: _Call, e: APIError) -> JSONResponse:
        self.buffer.add(call.event(e.status, e.code))
        return JSONResponse(e.body(), status_code=e.status)

    def _limits(self, call: _Call, prompts: list[list[int]], max_tokens: int | None, n: int,
                default: int | None, param: str) -> int:
        lim = self.cfg.limits
        longest = max(len(p) for p in prompts)
        if longest > lim.max_prompt_tokens:
            raise APIError(400, f"This server's limit is {lim.max_prompt_tokens} prompt tokens; your prompt has "
                                f"{longest}.", param=param, code="context_length_exceeded")
        if n * len(prompts) > lim.max_n:
            raise APIError(400, f"Invalid 'n': at most {lim.max_n} choices per request.", param="n",
                           code="invalid_value")
        if max_tokens is not None and max_tokens > lim.max_tokens:
            raise APIError(400, f"Invalid 'max_tokens': at most {lim.max_tokens} on this server.",
                           param="max_tokens", code="invalid_value")
        room = self.max_context - longest
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens. However, you "
                                f"requested {longest + (max_tokens or 1)} tokens ({longest} in the prompt, "
                                f"{max_tokens or 1} for the completion).", param=param,
                           code="context_length_exceeded")
        call.prompt_tokens = sum(len(p) for p in prompts)  # OpenAI counts a prompt once, whatever n is
        return max_tokens if max_tokens is not None else min(default or lim.max_tokens, lim.max_tokens, room)

    @staticmethod
    def _job(req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]], max_tokens: int) -> GenerationJob:
        from fineray.serve.sampling import SamplingParams

        return GenerationJob(prompts, req.n, SamplingParams.from_dict({**req.sampling(), "max_tokens": max_tokens}))

    # ------------------------------------------------------------------ endpoints
    @_endpoint("models")
    async def models(self, call: _Call, request: Request, model_id: str | None = None) -> Response:
        principal = self._principal(request)
        data = await asyncio.to_thread(self.catalog.list_models, principal, self.cfg.rollouts)
        if model_id is None:
            return JSONResponse({"object": "list", "data": data})
        hit = next((m for m in data if m["id"] == model_id), None)
        if hit is None:
            raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found",
                           param="model")
        return JSONResponse(hit)

    @_endpoint("chat")
    async def chat(self, call: _Call, request: Request) -> Response:
        principal, req = await self._parse(call, request, ChatCompletionRequest)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja templates raise their own errors
            raise APIError(400, f"Invalid 'messages': the chat template rejected them ({e}).",
                           param="messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = self._limits(call, [ids], req.max_tokens, req.n, None, "messages")
        job = self._job(req, [ids], max_tokens)
        if job.params.response_format is not None and self.cfg.engine != "vllm":
            raise APIError(400, "Invalid 'response_format': structured output (json_object / json_schema) needs "
                                "the vLLM engine on this server (serve.engine: vllm).", param="response_format",
                           code="unsupported_parameter")
        call.log_input = (principal.key_id, messages, None)
        return await self._answer(call, req, job, chat=True)

    @_endpoint("completions")
    async def completions(self, call: _Call, request: Request) -> Response:
        principal, req = await self._parse(call, request, CompletionRequest)
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append(self.tokenizer(p)["input_ids"])
            else:
                if any(not 0 <= t < self.vocab for t in p):
                    raise APIError(400, f"Invalid 'prompt': token ids must be in [0, {self.vocab}).",
                                   param="prompt", code="invalid_value")
                prompts.append(list(p))
        if any(not p for p in prompts):
            raise APIError(400, "Invalid 'prompt': empty prompt.", param="prompt", code="invalid_value")
        max_tokens = self._limits(call, prompts, req.max_tokens, req.n, 16, "prompt")
        job = self._job(req, prompts, max_tokens)
        echo = [self.tokenizer.decode(p) for p in prompts] if req.echo else None
        if self.reqlog is not None:
            call.log_input = (principal.key_id, None, "\n".join(self.tokenizer.decode(p) for p in prompts))
        return await self._answer(call, req, job, chat=False, echo=echo)

    @_endpoint("feedback")
    async def feedback(self, call: _Call, request: Request) -> Response:
        """`POST /v1/feedback {"id", "rating", "correction"?}` on a logged response (see `serve.requestlog`)."""
        principal = self._principal(request)
        if self.reqlog is None:
            raise APIError(404, "Feedback needs the request log: start the server with --log-requests URI.",
                           code="feedback_disabled")
        body = await self._json(request)
        out = await self.reqlog.feedback(body, principal.key_id)
        self.buffer.add({"event": "feedback", **out})
        return JSONResponse({"object": "feedback", "id": body["id"], "status": "recorded"})

    async def _answer(self, call: _Call, req: ChatCompletionRequest | CompletionRequest, job: GenerationJob, *,
                      chat: bool, echo: list[str] | None = None) -> Response:
        """Generate and answer: an SSE stream, or one chat.completion / text_completion object (logged)."""
        if req.stream:
            return await self._stream(call, req, job, chat=chat, echo=echo)
        choices = [c.as_dict() for c in await self._generate(call, job)]
        for c in choices if echo else []:
            c["text"] = echo[c["index"] // req.n] + c["text"]
        rid = new_id("chatcmpl" if chat else "cmpl")
        await self._log(call, rid, choices)
        build = chat_response if chat else completion_response
        return JSONResponse(build(rid, self._served(call), choices, usage(call.prompt_tokens, call.completion_tokens),
                                  self.fingerprint))

    async def _log(self, call: _Call, rid: str, choices: list[dict[str, Any]]) -> None:
        if self.reqlog is not None and call.log_input is not None:
            key_id, messages, prompt = call.log_input
            await self.reqlog.record(call, rid, key_id, messages, prompt, choices)

    async def metrics(self) -> Response:
        await self.flush()
        try:
            body = await self.hub.render.remote()
        except Exception as e:  # noqa: BLE001
            return JSONResponse(error_body(f"metrics hub unavailable: {e}", "server_error"), status_code=503)
        return Response(body, media_type=CONTENT_TYPE)

    async def health(self) -> Response:
        try:
            info = await asyncio.wait_for(self.model.ping.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "error": str(e)[:200]}, status_code=503)
        return JSONResponse({"status": "ok", "base": self.cfg.base, "auth": self.keys.enabled, "replica": info})

    # ------------------------------------------------------------------ generation
    def _served(self, call: _Call) -> str:
        """The `model` of a response: the adapter version that answered, or the base spec."""
        assert call.target is not None
        return call.target.ref or self.cfg.base

    def _handle(self, call: _Call, stream: bool) -> Any:
        assert call.target is not None
        return self.model.options(multiplexed_model_id=call.target.model_id, stream=stream)

    async def _generate(self, call: _Call, job: GenerationJob) -> list[ChoiceText]:
        try:
            out = await self._handle(call, False).generate.remote(job)
        except Exception as e:  # noqa: BLE001
            raise _serve_error(e) from None
        if isinstance(out, GenerationError):
            raise out.api_error()
        call.completion_tokens = sum(c.tokens for c in out)
        self.buffer.add(call.event(200))
        return out

    async def _stream(self, call: _Call, req: Any, job: GenerationJob, chat: bool,
                      echo: list[str] | None = None) -> Response:
        gen = self._handle(call, True).stream.remote(job)
        try:  # the first item says whether the request was admitted, so errors keep their status code
            first = await gen.__anext__()
        except Exception as e:  # noqa: BLE001
            raise _serve_error(e) from None
        if isinstance(first, GenerationError):
            raise first.api_error()
        return StreamingResponse(self._sse(call, req, job, gen, chat, echo), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, call: _Call, req: Any, job: GenerationJob, gen: Any, chat: bool,
                   echo: list[str] | None) -> AsyncIterator[str]:
        assert call.target is not None
        rid, created, model = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), self._served(call)
        choices = job.choices
        status, code = 200, None
        texts: dict[int, list[str]] = {i: [] for i in range(choices)}  # for the request log
        finish: dict[int, str] = {}
        try:
            for i in range(choices):
                if chat:
                    yield sse(chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""},
                                         fingerprint=self.fingerprint))
                elif echo:
                    yield sse(completion_chunk(rid, created, model, i, echo[i // req.n],
                                               fingerprint=self.fingerprint))
            async for items in gen:
                if isinstance(items, GenerationError):
                    status, code = items.status, items.code
                    yield sse(items.api_error().body())
                    yield SSE_DONE
                    return
                for it in items:
                    if it.text:
                        texts[it.index].append(it.text)
                        if call.ttft is None:
                            call.ttft = time.perf_counter() - call.t0
                        yield sse(chat_chunk(rid, created, model, it.index, {"content": it.text},
                                             fingerprint=self.fingerprint) if chat else
                                  completion_chunk(rid, created, model, it.index, it.text,
                                                   fingerprint=self.fingerprint))
                    if it.finish_reason:
                        finish[it.index] = it.finish_reason
                        call.completion_tokens += it.tokens
                        yield sse(chat_chunk(rid, created, model, it.index, {}, it.finish_reason,
                                             fingerprint=self.fingerprint) if chat else
                                  completion_chunk(rid, created, model, it.index, "", it.finish_reason,
                                                   fingerprint=self.fingerprint))
            if req.stream_options is not None and req.stream_options.include_usage:
                chunk = (chat_chunk if chat else completion_chunk)(rid, created, model, 0, {} if chat else "")
                chunk["choices"], chunk["usage"] = [], usage(call.prompt_tokens, call.completion_tokens)
                yield sse(chunk)
            await self._log(call, rid, [{"index": i, "text": "".join(t), "finish_reason": finish.get(i)}
                                        for i, t in texts.items()])
            yield SSE_DONE
        except asyncio.CancelledError:
            status, code = 499, "client_closed_request"  # nginx's code for a client that went away
            raise
        except Exception as e:  # noqa: BLE001
            err = _serve_error(e)
            status, code = err.status, err.code
            yield sse(err.body())
            yield SSE_DONE
        finally:
            self.buffer.add(call.event(status, code))


def _serve_error(e: Exception) -> APIError:
    """Map a Ray Serve failure to an OpenAI error."""
    name = type(e).__name__
    if "BackPressure" in name:
        return APIError(503, "The server is overloaded; retry later.", type="server_error", code="overloaded")
    if "Cancelled" in name:
        return APIError(499, "The request was cancelled.", type="server_error", code="cancelled")
    log.error("model deployment failed: %s", e)
    return APIError(500, f"The model server failed: {name}.", type="server_error", code="internal_error")
