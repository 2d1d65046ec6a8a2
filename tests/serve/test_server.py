"""The real server (`run_server` on loopback, one per module) over HTTP: OpenAI wire format streaming and
not, adapter outputs equal to PEFT's offline tokens, mixed-adapter batches, errors, auth, rollouts, hot
reloads, new adapters without a restart, and per-adapter Prometheus counters."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from fineray.serve.router import pick_variant
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration

ADMIN, SCOPED = "sk-admin-000000", "sk-alpha-000000"
MSGS = [{"role": "user", "content": "My order #123 never arrived"}]
SPLIT = [{"adapter": "alpha@v1", "weight": 0.7}, {"adapter": "beta@v1", "weight": 0.3}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: Path, split: list[dict]) -> None:
    path.write_text(yaml.safe_dump({
        "base": "tiny:llama", "registry": "registry", "max_adapters_per_replica": 2,
        "keys": [{"key": ADMIN, "name": "admin", "adapters": ["*"]},
                 {"key": SCOPED, "name": "team-alpha", "adapters": ["alpha", "base"]}],
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "limits": {"max_body_bytes": 2048, "max_prompt_tokens": 64, "max_tokens": 32, "max_n": 4},
        "rollouts": {"ab": split}, "registry_ttl_s": 0.5, "reload_interval_s": 0.2,
        "graceful_shutdown_timeout_s": 2,
    }))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path], shared_ray):
    from fineray.serve import load_serve_config, run_server

    root = tmp_path_factory.mktemp("serve")
    reg = AdapterRegistry(str(root / "registry"))
    for name in ("alpha", "beta"):
        reg.register(name, adapter_dirs[name], base_model="tiny:llama", method="lora")
    _write_config(root / "serve.yaml", SPLIT)
    cfg = load_serve_config(root / "serve.yaml", {"port": _free_port(), "ray": {"num_cpus": 2}})
    handle = run_server(cfg, blocking=False)
    client = httpx.Client(base_url=handle.url, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"})
    yield SimpleNamespace(url=handle.url, client=client, root=root, registry=reg)
    client.close()
    handle.shutdown()


def chat(server, model: str, key: str = ADMIN, **kw) -> httpx.Response:
    body = {"model": model, "messages": MSGS, "max_tokens": 12, "temperature": 0, **kw}
    return server.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def sse_events(text: str) -> list[str]:
    return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]


def metric_samples(server) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = server.client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def reference_text(tok, peft_reference, adapter: str | None, max_tokens: int = 12) -> tuple[str, int]:
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    ids = peft_reference(adapter, tok(text, add_special_tokens=False)["input_ids"], max_tokens)
    return tok.decode(ids, skip_special_tokens=True), len(ids)


def test_models_lists_base_adapters_and_rollouts(server):
    r = server.client.get("/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert [m["id"] for m in r.json()["data"]] == ["tiny:llama", "alpha", "beta", "ab"]
    scoped = server.client.get("/v1/models", headers={"Authorization": f"Bearer {SCOPED}"}).json()
    assert [m["id"] for m in scoped["data"]] == ["tiny:llama", "alpha"]
    assert server.client.get("/v1/models/alpha").json()["root"] == "alpha@v1"


def test_chat_non_streaming_is_well_formed_and_matches_peft(server, tiny_tok, peft_reference):
    # Execute
    out = {m: chat(server, m) for m in ("base", "alpha", "beta@v1")}
    # Assert
    for model, adapter in (("base", None), ("alpha", "alpha"), ("beta@v1", "beta")):
        r = out[model]
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == {"base": "tiny:llama", "alpha": "alpha@v1", "beta@v1": "beta@v1"}[model]
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        text, n_tokens = reference_text(tiny_tok, peft_reference, adapter)
        assert choice["message"]["content"] == text
        prompt = len(tiny_tok(tiny_tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"])
        assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": n_tokens,
                                 "total_tokens": prompt + n_tokens}
    texts = {m: r.json()["choices"][0]["message"]["content"] for m, r in out.items()}
    assert len(set(texts.values())) == 3  # the two adapters and the base all differ


def test_chat_streaming_sends_sse_chunks_and_done(server):
    # Prepare
    plain = chat(server, "alpha").json()["choices"][0]["message"]["content"]
    # Execute
    r = chat(server, "alpha", stream=True, stream_options={"include_usage": True})
    # Assert
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha@v1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == plain
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


def test_completions_streaming_and_not_with_n_and_seed(server):
    # Execute
    body = {"model": "beta", "prompt": "Dear support,", "max_tokens": 8, "temperature": 0.8, "seed": 7, "n": 2}
    r1 = server.client.post("/v1/completions", json=body)
    r2 = server.client.post("/v1/completions", json=body)
    rs = server.client.post("/v1/completions", json={**body, "stream": True})
    # Assert
    assert r1.status_code == 200, r1.text
    b1 = r1.json()
    assert b1["object"] == "text_completion" and [c["index"] for c in b1["choices"]] == [0, 1]
    assert [c["text"] for c in b1["choices"]] == [c["text"] for c in r2.json()["choices"]]  # seeded
    assert b1["usage"]["completion_tokens"] <= 16
    events = sse_events(rs.text)
    assert events[-1] == "[DONE]"
    streamed = {0: "", 1: ""}
    for e in events[:-1]:
        c = json.loads(e)["choices"][0]
        streamed[c["index"]] += c["text"]
    assert [streamed[0], streamed[1]] == [c["text"] for c in b1["choices"]]


def test_mixed_adapter_requests_batch_together_with_unchanged_tokens(server):
    # Prepare: the sequential answers
    models = ["alpha", "beta", "base"] * 2
    sequential = [chat(server, m).json()["choices"][0]["message"]["content"] for m in models]
    before = metric_samples(server)
    # Execute: the same requests at once
    with ThreadPoolExecutor(len(models)) as pool:
        concurrent = list(pool.map(lambda m: chat(server, m), models))
    # Assert
    assert [r.json()["choices"][0]["message"]["content"] for r in concurrent] == sequential

    def mixed_passes() -> float:
        now = metric_samples(server)
        key = ("fineray_batch_adapters_bucket", frozenset({("kind", "decode"), ("le", "1.0")}))
        count = ("fineray_batch_adapters_count", frozenset({("kind", "decode")}))
        grew = now.get(count, 0) - before.get(count, 0)
        single = now.get(key, 0) - before.get(key, 0)
        return grew - single  # forward passes that held two or more adapters

    assert wait_for(mixed_passes) > 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = server.client
    cases = [
        (c.post("/v1/chat/completions", content=b'{"model": "alpha", "messages": [', headers={
            "content-type": "application/json"}), 400, "invalid_json", None),
        (chat(server, "no-such-adapter"), 404, "model_not_found", "model"),
        (chat(server, "alpha", messages=[{"role": "user", "content": "refund " * 200}]), 400,
         "context_length_exceeded", "messages"),
        (chat(server, "alpha", max_tokens=-1), 400, "invalid_value", "max_tokens"),
        (chat(server, "alpha", max_tokens=33), 400, "invalid_value", "max_tokens"),
        (chat(server, "alpha", n=5), 400, "invalid_value", "n"),
        (chat(server, "alpha", frobnicate=True), 400, "unknown_parameter", "frobnicate"),
        (chat(server, "alpha", messages=[{"role": "user", "content": "x" * 3000}]), 413, "request_too_large", None),
        (c.get("/v1/nothing-here"), 404, "not_found", None),
    ]
    for r, status, code, param in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert (err["code"], err["param"]) == (code, param)
    assert chat(server, "alpha").status_code == 200


def test_api_keys_401_403_404(server):
    no_key = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "alpha", "messages": MSGS})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert chat(server, "alpha", key="sk-wrong-000000").status_code == 401
    assert chat(server, "beta", key=SCOPED).status_code == 403
    assert chat(server, "ab", key=SCOPED).status_code == 403
    assert chat(server, "unknown-one", key=SCOPED).status_code == 403  # not in the key's scope: no existence leak
    assert chat(server, "unknown-one").status_code == 404
    assert chat(server, "alpha", key=SCOPED).status_code == 200
    assert chat(server, "base", key=SCOPED).status_code == 200


def test_rollout_is_sticky_per_user_and_counted(server):
    # Prepare
    users = [f"user-{i}" for i in range(6)]
    expected = {u: pick_variant("ab", [(v["adapter"], v["weight"]) for v in SPLIT], u) for u in users}
    # Execute
    served = {u: {chat(server, "ab", user=u, max_tokens=2).json()["model"] for _ in range(2)} for u in users}
    # Assert
    assert served == {u: {v} for u, v in expected.items()}
    samples = wait_for(lambda: metric_samples(server).get(
        ("fineray_rollout_requests_total", frozenset({("rollout", "ab"), ("variant", "alpha@v1")}))))
    assert samples >= sum(v == "alpha@v1" for v in expected.values()) * 2


def test_new_weights_and_new_adapters_need_no_restart(server, adapter_dirs, tiny_tok, peft_reference):
    # Execute: all traffic of `ab` to beta, and a new adapter registered while serving
    _write_config(server.root / "serve.yaml", [{"adapter": "alpha@v1", "weight": 0}, {"adapter": "beta@v1",
                                                                                      "weight": 1}])
    server.registry.register("gamma", adapter_dirs["gamma"], base_model="tiny:llama", method="lora")
    # Assert
    assert wait_for(lambda: all(chat(server, "ab", max_tokens=1).json()["model"] == "beta@v1" for _ in range(4)))
    # the listing is cached for registry_ttl_s, so the new adapter shows up within a few seconds, not at once
    assert wait_for(lambda: "gamma" in [m["id"] for m in server.client.get("/v1/models").json()["data"]])
    r = chat(server, "gamma")
    assert r.status_code == 200 and r.json()["model"] == "gamma@v1"
    assert r.json()["choices"][0]["message"]["content"] == reference_text(tiny_tok, peft_reference, "gamma")[0]
    _write_config(server.root / "serve.yaml", SPLIT)


def test_metrics_have_per_adapter_counters_and_health(server):
    # Prepare
    before = metric_samples(server)
    key = ("fineray_requests_total", frozenset({("adapter", "beta"), ("version", "v1"), ("endpoint", "chat"),
                                                ("status", "200")}))
    # Execute: three adapters on a replica that holds two -> at least one eviction
    for m in ("beta", "beta", "alpha", "gamma", "beta"):
        assert chat(server, m).status_code == 200
    chat(server, "no-such-adapter")
    # Assert
    after = wait_for(lambda: (s := metric_samples(server)) and s.get(
        ("fineray_adapter_evictions_total", frozenset({("adapter", "alpha"), ("version", "v1")})), 0) + s.get(
        ("fineray_adapter_evictions_total", frozenset({("adapter", "beta"), ("version", "v1")})), 0) > 0 and s)
    assert after[key] - before.get(key, 0) == 3
    tokens = ("fineray_completion_tokens_total", frozenset({("adapter", "beta"), ("version", "v1")}))
    assert after[tokens] > before.get(tokens, 0)
    assert after[("fineray_adapter_loads_total", frozenset({("adapter", "gamma"), ("version", "v1")}))] >= 1
    assert after[("fineray_request_errors_total", frozenset({("adapter", "-"), ("version", ""), ("status", "404"),
                                                             ("code", "model_not_found")}))] >= 1
    latency = ("fineray_request_latency_seconds_count", frozenset({("adapter", "beta"), ("version", "v1"),
                                                                   ("endpoint", "chat")}))
    assert after[latency] >= 3
    health = server.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["auth"] is True
