"""Coordinator and silo processes over HTTPS on loopback: mutual TLS + tokens, refused silos, secure
aggregation end to end (equal to the plain weighted mean of the silos' own updates)."""

from __future__ import annotations

import json
import queue
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fineray.federated import generate_pki, run_coordinator, run_silo
from fineray.federated.client import SiloAuthError
from fineray.federated.wire import unpack_tensors
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
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
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
    assert row["status"] == "ok" and row["accepted"] == SILOS and row["attempts"] == 1
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
