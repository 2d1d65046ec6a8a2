"""The request log and `POST /v1/feedback` on a real server on loopback: ids and keys are checked, ratings
and corrections show per variant in /metrics, and `from-feedback` builds the expected SFT and preference
records from a scripted session."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from fineray.serve.feedback import build_feedback_dataset
from fineray.serve.requestlog import FEEDBACK, REQUESTS, read_table
from fineray.train.datasets import DatasetRegistry
from fineray.train.registry import AdapterRegistry
from tests.serve.test_server import _free_port

pytestmark = pytest.mark.integration

ADMIN, SCOPED = "sk-admin-111111", "sk-alpha-111111"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path], shared_ray):
    from fineray.serve import load_serve_config, run_server

    root = tmp_path_factory.mktemp("feedback")
    reg = AdapterRegistry(str(root / "registry"))
    for name in ("alpha", "beta"):
        reg.register(name, adapter_dirs[name], base_model="tiny:llama", method="lora")
    (root / "serve.yaml").write_text(yaml.safe_dump({
        "base": "tiny:llama", "registry": "registry", "log_requests": str(root / "logs"), "log_flush_s": 0.2,
        "keys": [{"key": ADMIN, "name": "admin", "adapters": ["*"]},
                 {"key": SCOPED, "name": "team-alpha", "adapters": ["alpha", "base"]}],
        "rollouts": {"ab": [{"adapter": "alpha@v1", "weight": 0.5}, {"adapter": "beta@v1", "weight": 0.5}]},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}, "graceful_shutdown_timeout_s": 2,
    }))
    cfg = load_serve_config(root / "serve.yaml", {"port": _free_port(), "ray": {"num_cpus": 2}})
    handle = run_server(cfg, blocking=False)
    client = httpx.Client(base_url=handle.url, timeout=120)
    yield SimpleNamespace(client=client, logs=str(root / "logs"), root=root)
    client.close()
    handle.shutdown()


def chat(server, key: str, model: str, text: str, **kw) -> dict:
    r = server.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                                 "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def rate(server, key: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return server.client.post("/v1/feedback", headers=headers, json=body)


def wait_rows(logs: str, table: str, n: int) -> list[dict]:
    deadline = time.monotonic() + 20
    while True:
        rows = read_table(logs, table)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_feedback_rejects_unknown_ids_foreign_keys_and_bad_bodies(server):
    rid = chat(server, SCOPED, "alpha", "Where is order 42?")["id"]
    # Execute + Assert
    assert rate(server, ADMIN, {"id": rid, "rating": 1}).status_code == 403  # returned to another key
    unknown = rate(server, SCOPED, {"id": "chatcmpl-doesnotexist", "rating": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "response_not_found"
    assert rate(server, None, {"id": rid, "rating": 1}).status_code == 401
    bad = rate(server, SCOPED, {"id": rid, "rating": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    assert rate(server, SCOPED, {"id": rid, "rating": 1, "stars": 3}).status_code == 400
    ok = rate(server, SCOPED, {"id": rid, "rating": 1})
    assert ok.status_code == 200 and ok.json() == {"object": "feedback", "id": rid, "status": "recorded"}


def test_scripted_session_builds_sft_and_preference_records(server, tmp_path):
    # Prepare: a session of five responses (one streamed, two through the A/B rollout)
    t0 = time.time()  # the window of this session (the module's other tests log responses too)
    p1, p2, p3, p4 = ("Mail maria@example.com my invoice", "Where is order 7?", "Refund order 9", "Cancel order 11")
    r1 = chat(server, SCOPED, "alpha", p1)
    r2, r3 = chat(server, ADMIN, "alpha", p2), chat(server, ADMIN, "beta", p2)
    stream = server.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                                json={"model": "alpha", "messages": [{"role": "user", "content": p3}],
                                      "max_tokens": 8, "temperature": 0, "stream": True})
    events = [b[6:] for b in stream.text.split("\n\n") if b.startswith("data: ") and b != "data: [DONE]"]
    r4_id = json.loads(events[0])["id"]
    r4_text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events if json.loads(e)["choices"])
    r5 = chat(server, ADMIN, "ab", p4, user="user-5")
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    assert text(r2) != text(r3)  # two adapters, two answers
    # Execute: ratings and corrections as a reviewer script would send them
    for key, body in ((SCOPED, {"id": r1["id"], "rating": -1, "correction": "Sent to maria@example.com"}),
                      (ADMIN, {"id": r2["id"], "rating": 1}), (ADMIN, {"id": r3["id"], "rating": -1}),
                      (ADMIN, {"id": r4_id, "rating": 1}), (ADMIN, {"id": r5["id"], "rating": -1, "correction": "C5"})):
        assert rate(server, key, body).status_code == 200
    requests, feedback = wait_rows(server.logs, REQUESTS, 6), wait_rows(server.logs, FEEDBACK, 6)
    version, counts = build_feedback_dataset(server.logs, str(tmp_path / "reg"), "fb", since_s=time.time() - t0)
    # Assert: the log is redacted and labelled
    logged = {r["id"]: r for r in requests}
    assert "<EMAIL>" in logged[r1["id"]]["messages"] and "maria@" not in logged[r1["id"]]["messages"]
    assert logged[r1["id"]]["key_id"] == hashlib.sha256(SCOPED.encode()).hexdigest()[:16]
    assert logged[r4_id]["response"] == r4_text and logged[r5["id"]]["rollout"] == "ab"
    assert logged[r5["id"]]["variant"] == r5["model"] and any(f["correction"] == "Sent to <EMAIL>" for f in feedback)
    # Assert: the datasets
    user = lambda p: [{"role": "user", "content": p.replace("maria@example.com", "<EMAIL>")}]  # noqa: E731
    rows = lambda split: sorted(json.dumps(r, sort_keys=True) for r in _records(tmp_path / "reg", split))  # noqa: E731
    assert rows("train") == sorted(json.dumps(r, sort_keys=True) for r in (
        {"messages": user(p1) + [{"role": "assistant", "content": "Sent to <EMAIL>"}]},
        {"messages": user(p2) + [{"role": "assistant", "content": text(r2)}]},
        {"messages": user(p3) + [{"role": "assistant", "content": r4_text}]},
        {"messages": user(p4) + [{"role": "assistant", "content": "C5"}]}))
    pair = lambda p, c, r: {"prompt": user(p), "chosen": [{"role": "assistant", "content": c}],  # noqa: E731
                            "rejected": [{"role": "assistant", "content": r}]}
    assert rows("preference") == sorted(json.dumps(r, sort_keys=True) for r in (
        pair(p1, "Sent to <EMAIL>", text(r1)), pair(p2, text(r2), text(r3)), pair(p4, "C5", text(r5))))
    assert version.manifest["splits"] == {"train": {"records": 4}, "preference": {"records": 3}}
    assert counts["sft_from_correction"] == 2 and counts["sft_from_rated"] == 2
    assert DatasetRegistry(str(tmp_path / "reg")).verify("fb@v1") == []


def test_feedback_shows_per_variant_in_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    rid = chat(server, ADMIN, "ab", "Is order 3 late?", user="user-m")["id"]
    variant = chat(server, ADMIN, "ab", "Is order 3 late?", user="user-m")["model"]
    assert rate(server, ADMIN, {"id": rid, "rating": 0.5, "correction": "late"}).status_code == 200

    def samples() -> dict:
        text = server.client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    adapter, version = variant.split("@")
    labels = frozenset({"adapter": adapter, "version": version, "rollout": "ab", "variant": variant}.items())
    deadline = time.monotonic() + 10
    while samples().get(("fineray_feedback_corrections_total", labels)) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    s = samples()
    assert s[("fineray_feedback_corrections_total", labels)] == 1
    positive = frozenset({*labels, ("sentiment", "positive")})
    assert s[("fineray_feedback_ratings_total", positive)] >= 1 and s[("fineray_feedback_rating_sum", labels)] >= 0.5


def _records(root: Path, split: str) -> list[dict]:
    from fineray.train.data import iter_records

    return [rec for rec, _ in iter_records(f"dataset:{root}/fb@v1:{split}")]
