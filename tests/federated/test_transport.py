"""Coordinator and silos over HTTPS on loopback (Starlette + uvicorn): mutual TLS + tokens, the HTTP codes of
refused requests, secure aggregation end to end (equal to the plain weighted mean of the silos' own updates),
and a silo that dies after sharing its keys (the round completes with the survivors)."""

from __future__ import annotations

import json
import queue
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fineray.federated.client as client_module
from fineray.federated import generate_pki, run_coordinator, run_silo
from fineray.federated.client import SiloAuthError, SiloClient
from fineray.federated.silo import SiloWorker
from fineray.federated.wire import pack_tensors, unpack_tensors
from fineray.train.config import load_config
from fineray.train.data import read_records

SILOS = ["acme", "globex", "initech"]
SILO_MAIN = """
import json, sys
from fineray.federated import run_silo
a = json.loads(sys.argv[1])
out = run_silo(a["url"], a["name"], a["data"], a["token"], ca=a["ca"], cert=a["cert"], key=a["key"],
               work_dir=a["work"], trainer="local", num_cpus=1, poll_s=0.3, max_wait_s=120)
print("SILO-SUMMARY " + json.dumps(out), flush=True)
"""


class Crash(Exception):
    """The silo's process dies here."""


class UpdateOnlySilo(SiloWorker):
    """A real ``SiloWorker`` (split, cache, secure-aggregation steps) whose local "training" adds a seeded
    perturbation to the global adapter instead of running a model; "initech" dies before masking."""

    def _train_round(self, task, global_t, residual_blob, rdir):
        gen = torch.Generator().manual_seed(len(self.name) * 1000 + int(task["round"]))
        final = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in global_t.items()}
        return final, {"train_loss": 2.0, "steps": 1}

    def evaluate(self, adapter_blob, residual_blob=None, data=None, max_examples=200):
        return {"loss": 2.0, "tokens": 16}

    def secagg_mask(self, task):
        if self.name == "initech":
            raise Crash("machine lost after sharing its keys")
        return super().secagg_mask(task)


def _declare_huge_body(url: str, cert: tuple[str, str], ca: str, token: str) -> str:
    """The raw answer to a POST declaring a 3 GiB body (no client library sends a body it does not have)."""
    host, port = url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(*cert)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"POST /v1/rounds/1/masked HTTP/1.1\r\nHost: {host}\r\nX-Fineray-Silo: acme\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Length: {3 << 30}\r\n\r\n".encode())
        answer = b""
        while b"}" not in answer:
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode()


def _start_coordinator(cfg, *args, **kw) -> tuple[str, dict[str, object], threading.Thread]:
    urls: queue.Queue[str] = queue.Queue()
    outcome: dict[str, object] = {}

    def coordinator() -> None:
        try:
            outcome["result"] = run_coordinator(cfg, "127.0.0.1", 0, *args, progress=False, on_ready=urls.put, **kw)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertions
            outcome["error"] = e

    thread = threading.Thread(target=coordinator, daemon=True)
    thread.start()
    return urls.get(timeout=120), outcome, thread


def test_https_codes_certificate_identity_and_a_silo_dropping_after_sharing(tmp_path: Path, monkeypatch):
    # Prepare: mutual TLS + tokens, secure aggregation (threshold 2 of 3), silos without a model.
    pki = generate_pki(tmp_path / "pki", [*SILOS, "mallory"])
    tokens = {n: secrets.token_hex(16) for n in SILOS}
    data = _silo_files(tmp_path)
    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.alpha=8", f"output.dir={tmp_path / 'runs'}",
                             f"output.registry={tmp_path / 'reg'}", "output.name=fast"])
    cfg.federated = {"silos": [{"name": n} for n in SILOS], "rounds": 1, "local_steps": 1, "min_silos": 2,
                     "round_timeout_s": 60, "final_eval_timeout_s": 5,
                     "secure_aggregation": {"enabled": True, "clip": 4.0, "threshold": 2, "mask_timeout_s": 3}}
    monkeypatch.setattr(client_module, "SiloWorker", UpdateOnlySilo)
    url, outcome, thread = _start_coordinator(cfg, *pki["server"], pki["ca"][0], tokens, start_wait_s=60,
                                              linger_s=1, online_window_s=2)
    ca = pki["ca"][0]

    def call(cert: str, token: str | None, method: str, path: str, name: str | None = None, **kw):
        c = SiloClient(url, name or "", token, ca=ca, cert=pki[cert][0], key=pki[cert][1])
        if name is None:
            c.http.headers.pop("X-Fineray-Silo")
        try:
            return c.http.request(method, path, **kw)
        finally:
            c.close()

    # Execute / Assert: the HTTP answers, each a JSON error naming the problem.
    assert call("acme", None, "GET", "/v1/health").json() == {"ok": True}
    no_header = call("acme", tokens["acme"], "GET", "/v1/config")  # identity from the certificate alone
    assert no_header.status_code == 200 and no_header.json()["silo"] == "acme"
    codes = {
        "wrong token": call("acme", "nope", "GET", "/v1/config", "acme"),
        "someone else's certificate": call("globex", tokens["acme"], "GET", "/v1/config", "acme"),
        "not a silo": call("mallory", None, "GET", "/v1/config"),  # no token for mallory
        "no route": call("acme", tokens["acme"], "GET", "/v1/nothing", "acme"),
        "wrong method": call("acme", tokens["acme"], "GET", "/v1/eval", "acme"),
        "bad JSON": call("acme", tokens["acme"], "POST", "/v1/eval", "acme", content=b"{not json"),
        "keys without example count": call("acme", tokens["acme"], "POST", "/v1/rounds/1/keys", "acme",
                                           json={"keys": {}}),
        "no round": call("acme", tokens["acme"], "POST", "/v1/rounds/7/update", "acme",
                         content=pack_tensors({"w": torch.zeros(2)}, {"num_examples": 1})),
    }
    too_large = _declare_huge_body(url, pki["acme"], ca, tokens["acme"])
    assert {k: r.status_code for k, r in codes.items()} == {
        "wrong token": 401, "someone else's certificate": 403, "not a silo": 401, "no route": 404,
        "wrong method": 405, "bad JSON": 400, "keys without example count": 400, "no round": 409}
    assert too_large.startswith("HTTP/1.1 413") and '"error":"body of 3221225472 bytes exceeds' in too_large
    assert all("error" in r.json() for r in codes.values())
    assert "certificate is for 'globex', not silo 'acme'" in codes["someone else's certificate"].json()["error"]
    assert "unknown silo or wrong token" in codes["not a silo"].json()["error"]
    assert "no route GET /v1/nothing" in codes["no route"].json()["error"]
    assert "no round is open" in codes["no round"].json()["error"]
    # The three silos take part; "initech" dies after it shared its keys, before sending its masked vector.
    summaries, errors = {}, {}

    def silo(n: str) -> None:
        try:
            summaries[n] = run_silo(url, n, data[n], tokens[n], ca=ca, cert=pki[n][0], key=pki[n][1],
                                    work_dir=tmp_path / f"w-{n}", trainer="local", poll_s=0.1, max_wait_s=60)
        except Crash as e:
            errors[n] = e

    threads = [threading.Thread(target=silo, args=(n,), daemon=True) for n in SILOS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    thread.join(timeout=60)
    # Assert: the round completed without initech, and equals the survivors' plain example-weighted mean.
    assert "error" not in outcome, outcome.get("error")
    assert set(errors) == {"initech"} and set(summaries) == {"acme", "globex"}
    row = outcome["result"].rounds[0]
    assert row["status"] == "ok" and row["accepted"] == ["acme", "globex"] and row["dropped"] == ["initech"]
    alive = ["acme", "globex"]
    updates = {n: unpack_tensors((tmp_path / f"w-{n}" / "round_000001" / "update.safetensors").read_bytes())[0]
               for n in alive}
    counts = {n: len(read_records(str(tmp_path / f"w-{n}" / "data" / "train.jsonl"))) for n in alive}
    final = load_file(str(Path(outcome["result"].run_dir) / "federation" / "round_000001" / "global_adapter.safetensors"))
    for k, v in final.items():
        plain = sum(updates[n][k].double() * counts[n] for n in alive) / sum(counts.values())
        torch.testing.assert_close(v.double(), plain, atol=1e-5, rtol=0)


def _silo_files(tmp: Path) -> dict[str, str]:
    records = [rec for rec, _ in read_records("fineray:support-tickets")]
    out = {}
    for i, name in enumerate(SILOS):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[40 * i:40 * i + 40]))
        out[name] = str(path)
    return out


@pytest.mark.integration
def test_https_federation_mtls_tokens_secagg_and_refused_silos(tmp_path: Path):
    # Prepare: PKI, tokens, data, and the coordinator in a thread on a free port.
    pki = generate_pki(tmp_path / "pki", [*SILOS, "mallory"])
    tokens = {n: secrets.token_hex(16) for n in SILOS}
    data = _silo_files(tmp_path)
    cfg = load_config(None, ["model.base=tiny:llama", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
                             "train.batch_size=4", "train.lr=3e-3", "data.max_seq_len=256",
                             f"output.dir={tmp_path / 'runs'}", f"output.registry={tmp_path / 'reg'}", "output.name=net"])
    cfg.federated = {"silos": [{"name": n} for n in SILOS], "rounds": 1, "local_steps": 3, "min_silos": 3,
                     "round_timeout_s": 300, "eval_max_examples": 8, "final_eval_timeout_s": 120,
                     "secure_aggregation": {"enabled": True, "clip": 4.0, "mask_timeout_s": 120}}
    urls: queue.Queue[str] = queue.Queue()
    outcome: dict[str, object] = {}

    def coordinator() -> None:
        try:
            outcome["result"] = run_coordinator(cfg, "127.0.0.1", 0, *pki["server"], pki["ca"][0], tokens,
                                                progress=False, on_ready=urls.put, start_wait_s=300, linger_s=2)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertions
            outcome["error"] = e

    thread = threading.Thread(target=coordinator, daemon=True)
    thread.start()
    url = urls.get(timeout=120)
    ca = pki["ca"][0]
    # Execute: two refused silos (wrong token; someone else's certificate), then three real silo processes.
    with pytest.raises(SiloAuthError, match="401"):
        run_silo(url, "acme", data["acme"], "not-the-token", ca=ca, cert=pki["acme"][0], key=pki["acme"][1],
                 trainer="local", work_dir=tmp_path / "w-bad")
    with pytest.raises(SiloAuthError, match="403"):
        run_silo(url, "acme", data["acme"], tokens["acme"], ca=ca, cert=pki["mallory"][0], key=pki["mallory"][1],
                 trainer="local", work_dir=tmp_path / "w-bad")
    procs = {}
    for n in SILOS:
        args = {"url": url, "name": n, "data": data[n], "token": tokens[n], "ca": ca, "cert": pki[n][0],
                "key": pki[n][1], "work": str(tmp_path / f"w-{n}")}
        procs[n] = subprocess.Popen([sys.executable, "-c", SILO_MAIN, json.dumps(args)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    logs = {n: p.communicate(timeout=500)[0] for n, p in procs.items()}
    thread.join(timeout=120)
    # Assert
    assert "error" not in outcome, outcome.get("error")
    assert all(p.returncode == 0 for p in procs.values()), {n: logs[n][-2000:] for n in SILOS}
    result = outcome["result"]
    row = result.rounds[0]
    assert row["status"] == "ok" and row["accepted"] == SILOS and row["dropped"] == []
    assert set(result.initial_eval["per_silo"]) == set(SILOS) and set(row["eval"]["per_silo"]) == set(SILOS)
    summaries = {n: json.loads(logs[n].split("SILO-SUMMARY ")[1]) for n in SILOS}
    assert all(s["rounds_trained"] == 1 and s["evaluations"] == 2 for s in summaries.values())
    # The coordinator saw only masked vectors; its aggregate equals the plain example-weighted mean of the
    # updates each silo kept locally, up to fixed-point quantisation (2^-24).
    updates = {n: unpack_tensors((tmp_path / f"w-{n}" / "round_000001" / "update.safetensors").read_bytes())[0]
               for n in SILOS}
    counts = {n: len(read_records(str(tmp_path / f"w-{n}" / "data" / "train.jsonl"))) for n in SILOS}
    total = sum(counts.values())
    final = load_file(str(Path(result.run_dir) / "federation" / "round_000001" / "global_adapter.safetensors"))
    for k, v in final.items():
        plain = sum(updates[n][k].double() * counts[n] for n in SILOS) / total
        torch.testing.assert_close(v.double(), plain, atol=1e-5, rtol=0)
    assert result.registry_ref == "net@v1"
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
