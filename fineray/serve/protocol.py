"""OpenAI wire format: request models, response and stream-chunk builders, and the error body.

Requests are validated here (pydantic) so every bad field becomes a 400 with OpenAI's error body naming the
`param`. Parameters OpenAI accepts but this server cannot honour (tools, logprobs, non-text response
formats) are rejected with a 400 rather than silently ignored; bookkeeping fields (`store`, `metadata`,
`service_tier`) are accepted and ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "SSE_DONE",
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "new_id",
    "parse_request",
    "sse",
    "usage",
]

SSE_DONE = "data: [DONE]\n\n"


class APIError(Exception):
    """An error returned to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Req):
    include_usage: bool = False


class ContentPart(_Req):
    type: str
    text: str | None = None


class ChatMessage(_Req):
    """One chat turn; `content` may be a string or a list of `{type: text, text}` parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"content part type {p.type!r} is not supported (text only)")
            out.append(p.text)
        return "".join(out)


class _Sampling(_Req):
    """Parameters shared by chat and completions."""

    model: str = Field(min_length=1, max_length=200)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    # accepted and ignored (bookkeeping fields some SDKs send)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        if isinstance(self.stop, list):
            if len(self.stop) > 4:
                raise _param("stop", "at most 4 stop sequences")
            if any(not s for s in self.stop):
                raise _param("stop", "stop sequences must be non-empty")
        elif self.stop == "":
            self.stop = None
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit() or not -100 <= v <= 100:
                raise _param("logit_bias", "keys must be token ids and values in [-100, 100]")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict[str, Any]:
        """The generation parameters the model deployment needs."""
        return {"temperature": self.temperature, "top_p": self.top_p, "stop": self.stops(),
                "seed": self.seed, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "logit_bias": {int(k): float(v) for k, v in (self.logit_bias or {}).items()}}


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if (self.response_format or {}).get("type") in ("json_object", "json_schema"):
            out["response_format"] = self.response_format
        return out

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise _param("logprobs", "logprobs are not supported by this server")
        fmt = self.response_format or {}
        if fmt.get("type") not in (None, "text", "json_object", "json_schema"):
            raise _param("response_format", "type must be text, json_object or json_schema")
        if fmt.get("type") == "json_schema" and not isinstance((fmt.get("json_schema") or {}).get("schema"), dict):
            raise _param("response_format", "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        if self.tools or self.tool_choice not in (None, "none"):
            raise _param("tools", "tool calling is not supported by this server")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as e:
                raise _param(f"messages.{i}.content", str(e)) from None
        return self


class CompletionRequest(_Sampling):
    """`POST /v1/completions` (legacy text completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise _param("suffix", "suffix is not supported by this server")
        if self.logprobs:
            raise _param("logprobs", "logprobs are not supported by this server")
        if self.best_of not in (None, self.n):
            raise _param("best_of", "best_of must equal n (no server-side best-of selection)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _param("prompt", "prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class _ParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _param(param: str, message: str) -> _ParamError:
    return _ParamError(param, message)


def parse_request(cls: type[_Sampling], data: Any) -> Any:
    """Validate a decoded JSON body; raise `APIError(400)` naming the offending parameter."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _ParamError):
            raise APIError(400, f"Invalid '{ctx_err.param}': {ctx_err}", param=ctx_err.param,
                           code="invalid_value") from None
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "str", "int")))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{loc}'.", param=loc,
                           code="missing_required_parameter") from None
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        raise APIError(400, f"Invalid '{loc}': {err['msg']}{shown}.", param=loc or None,
                       code="invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int],
                  fingerprint: str | None = None) -> dict[str, Any]:
    """A `chat.completion` object; choices carry `text` and `finish_reason`."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"], "refusal": None},
                     "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
        "usage": use,
    }


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int],
                        fingerprint: str | None = None) -> dict[str, Any]:
    """A `text_completion` object."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                     "finish_reason": c["finish_reason"]} for c in choices],
        "usage": use,
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """One streamed `text_completion` chunk."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event line pair."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
