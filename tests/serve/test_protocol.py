"""OpenAI request validation: every bad field becomes a 400 that names its `param`; response shapes."""

from __future__ import annotations

import json

import pytest

from fineray.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_response,
    parse_request,
    sse,
    usage,
)

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param, code", [
    ({"model": "a", "messages": MSG, "max_tokens": -5}, "max_tokens", "invalid_value"),
    ({"model": "a", "messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "a", "messages": []}, "messages", "invalid_value"),
    ({"messages": MSG}, "model", "missing_required_parameter"),
    ({"model": "a", "messages": MSG, "bogus": 1}, "bogus", "unknown_parameter"),
    ({"model": "a", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"model": "a", "messages": MSG, "tools": [{"type": "function"}]}, "tools", "invalid_value"),
    ({"model": "a", "messages": MSG, "logprobs": True}, "logprobs", "invalid_value"),
    ({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content",
     "invalid_value"),
    ({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
])
def test_chat_request_errors_name_the_param(body, param, code):
    with pytest.raises(APIError) as e:
        parse_request(ChatCompletionRequest, body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_request_accepts_parts_and_new_max_completion_tokens():
    req = parse_request(ChatCompletionRequest, {
        "model": "a", "max_completion_tokens": 9, "stop": "###", "seed": 3, "user": "u1", "store": False,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]})
    assert req.max_tokens == 9 and req.stops() == ["###"] and req.messages[1].text() == "hello"
    assert req.sampling()["seed"] == 3


def test_completion_request_prompt_forms():
    assert parse_request(CompletionRequest, {"model": "a", "prompt": "x"}).prompts() == ["x"]
    assert parse_request(CompletionRequest, {"model": "a", "prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert parse_request(CompletionRequest, {"model": "a", "prompt": ["x", "y"]}).prompts() == ["x", "y"]
    with pytest.raises(APIError, match="best_of"):
        parse_request(CompletionRequest, {"model": "a", "prompt": "x", "best_of": 3})
    with pytest.raises(APIError, match="JSON object"):
        parse_request(CompletionRequest, ["not", "an", "object"])


def test_response_shapes_follow_openai():
    chat = chat_response("chatcmpl-1", "m@v1", [{"index": 0, "text": "hi", "finish_reason": "stop"}], usage(3, 1))
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == {
        "role": "assistant", "content": "hi", "refusal": None}
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    comp = completion_response("cmpl-1", "m", [{"index": 0, "text": "x", "finish_reason": "length"}], usage(1, 1))
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == "x"
    line = sse(chat_chunk("c", 1, "m", 0, {"content": "h"}))
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line[6:])["choices"][0]["delta"] == {"content": "h"}
