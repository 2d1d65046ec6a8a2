"""A real sweep on the tiny model: the driver is killed mid-sweep, `resume_sweep` finishes it without re-running
finished trials; ASHA stopped trials early; the best trial is the best reported one; its adapter is in the
registry with intact hashes, its hyperparameters and the sweep id. The sweep trains DPO on preference pairs and
optimises a preference metric the loop reports at every eval (so ASHA acts on it): a sweep over any objective is
the same trial code, and one sweep costs ~2 minutes of Ray process starts here, so one sweep covers both."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fineray.train.config import load_config
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration

NUM_SAMPLES = 4
METRIC = "val_reward_margin"  # mean(chosen - rejected implicit reward) on held-out pairs: continuous, no ties
SWEEP = {
    "model": {"base": "tiny:llama"},
    "objective": "dpo",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "data": {"train": "fineray:support-pairs", "validation": "fineray:support-pairs/val", "max_seq_len": 256,
             "max_examples": 32},
    "train": {"lr": 1.0e-3, "max_steps": 6, "batch_size": 2, "eval_every": 2, "eval_batches": 2,
              "warmup_ratio": 0.0, "seed": 1, "log_every": 4},
    "scaling": {"num_workers": 1},
    "cluster": {"num_cpus": 2},
    "eval": {"enabled": False},
    "tune": {"metric": METRIC, "mode": "max", "num_samples": NUM_SAMPLES, "seed": 3,
             "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
             "search_space": {"train.lr": {"loguniform": [1.0e-5, 3.0e-2]}, "lora.r": {"choice": [4, 8, 16]}}},
}
DRIVER = """
import sys
from fineray.train.config import load_config
from fineray.tune import run_sweep
run_sweep(load_config(sys.argv[1]), progress=False)
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then anything left in its process group (its private Ray)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, shared_ray) -> dict[str, Any]:
    """Run the sweep in a subprocess, kill it after its first finished trial, resume it here."""
    from ray.tune import ExperimentAnalysis

    from fineray.tune import resume_sweep
    from fineray.tune.state import repair

    root = tmp_path_factory.mktemp("sweep")
    cfg = {**SWEEP, "output": {"dir": str(root / "runs"), "registry": str(root / "adapters"), "name": "sw"}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    (root / "driver.py").write_text(DRIVER)
    sweep_dir = root / "runs" / "sw"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    with open(root / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(root / "driver.py"), str(root / "sweep.yaml")], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 480
            while not _lines(sweep_dir / "trials.jsonl"):
                assert proc.poll() is None, (root / "driver.log").read_text()[-3000:]
                assert time.time() < deadline, "no trial finished in time"
                time.sleep(0.5)
            time.sleep(5)  # > Tune's save period (1 s) and the driver's snapshot period (3 s)
        finally:
            _kill_group(proc)
    killed_at = time.time()
    # trials whose driver wrote final.json (training done) before the kill
    trained = {p.parent.name for p in (sweep_dir / "trials").glob("*/final.json")}
    repaired = repair(str(sweep_dir))  # what resume_sweep does first (a kill can truncate Tune's files)
    saved = ExperimentAnalysis(str(sweep_dir / "tune"))
    finished_before = {t.trial_id for t in saved.trials if t.status == "TERMINATED"}
    assert finished_before, "the kill came before Tune saved a finished trial"
    assert len(trained) < NUM_SAMPLES
    t0 = time.perf_counter()
    result = resume_sweep(sweep_dir, progress=False)
    return {"result": result, "finished_before": finished_before, "trained": trained, "killed_at": killed_at,
            "dir": sweep_dir, "root": root, "resume_s": time.perf_counter() - t0, "repaired": repaired}


def test_resume_finishes_without_rerunning_finished_trials(sweep: dict[str, Any]) -> None:
    # Prepare
    res, d = sweep["result"], sweep["dir"]
    by_id = {r["trial_id"]: r for r in res.trials}
    # Assert: every sample ran, none failed
    assert len(res.trials) == NUM_SAMPLES and res.errors == []
    assert all(r["status"] == "TERMINATED" for r in res.trials)
    # trials Tune had saved as finished were not started again
    assert all(by_id[tid]["attempts"] == 1 for tid in sweep["finished_before"])
    # no trial that had finished (or was stopped) before the kill trained again: a trial that finished in the
    # last seconds, before Tune saved its state, is restarted but only re-reports its final.json
    for tid in sweep["trained"] | sweep["finished_before"]:
        files = [p for p in (d / "trials" / tid).rglob("*") if p.is_file() and p.name != "attempts.jsonl"]
        assert max(p.stat().st_mtime for p in files) < sweep["killed_at"], tid
    # trials.jsonl lists every trial once (pre-kill lines + resumed ones)
    ids = [row["trial_id"] for row in _lines(d / "trials.jsonl")]
    assert sorted(ids) == sorted(by_id)


def test_asha_stopped_trials_early(sweep: dict[str, Any]) -> None:
    # Prepare
    res = sweep["result"]
    stopped = [r for r in res.trials if r["early_stopped"]]
    full = [r for r in res.trials if not r["early_stopped"]]
    # Assert: early-stopped trials ended before max_steps; the others ran all 6 steps
    assert stopped, [(r["trial_id"], r["step"]) for r in res.trials]
    assert all(r["step"] < 6 for r in stopped)
    assert full and all(r["step"] == 6 for r in full)


def test_best_trial_has_the_best_reported_metric(sweep: dict[str, Any]) -> None:
    # Prepare
    res = sweep["result"]
    margins = {r["trial_id"]: r["metrics"][METRIC] for r in res.trials}
    # Assert
    assert res.best["trial_id"] == max(margins, key=margins.get)
    assert res.best["metrics"][METRIC] == max(margins.values())
    # one trial evaluated the base config's own values (points_to_evaluate; TPE draws nothing this round).
    # Which position it has in the list depends on Tune's result order after the resume, not on creation.
    assert {"train.lr": 1.0e-3, "lora.r": 8} in [r["params"] for r in res.trials]


def test_best_adapter_is_registered_with_hashes_and_hyperparameters(sweep: dict[str, Any]) -> None:
    # Prepare
    res = sweep["result"]
    reg = AdapterRegistry(str(sweep["root"] / "adapters"))
    # Execute
    version = reg.get(res.registry_ref)
    # Assert
    assert reg.verify(res.registry_ref) == []
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(version.manifest["files"])
    hp = version.manifest["hyperparameters"]
    assert hp["searched"] == res.best["params"]
    assert hp["train"]["lr"] == res.best["params"]["train.lr"] and hp["lora"]["r"] == res.best["params"]["lora.r"]
    assert version.manifest["metrics"][METRIC] == res.best["metrics"][METRIC]
    assert hp["objective"] == "dpo" and version.manifest["lineage"]["training_objective"] == "dpo"
    assert version.manifest["lineage"]["sweep_id"] == "sw"
    assert version.manifest["lineage"]["trial_id"] == res.best["trial_id"]


def test_outputs_best_config_and_plots(sweep: dict[str, Any]) -> None:
    # Prepare
    res, d = sweep["result"], sweep["dir"]
    # Execute
    best_cfg = load_config(res.best_config_path)
    summary = json.loads((d / "results.json").read_text())
    # Assert
    assert res.best_config_path == d / "best_config.yaml"
    assert (best_cfg.train.lr, best_cfg.lora.r) == (res.best["params"]["train.lr"], res.best["params"]["lora.r"])
    assert best_cfg.tune is None and best_cfg.train.max_steps == 6
    assert summary["best"]["trial_id"] == res.best["trial_id"] and len(summary["trials"]) == NUM_SAMPLES
    assert {p.name for p in res.plots} == {"optimization_history.png", "param_importances.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in res.plots)


def test_eval_metric_of_the_best_adapter(sweep: dict[str, Any]) -> None:
    """The per-trial held-out evaluation used for eval objectives (e.g. field_accuracy)."""
    from fineray.tune.trainable import evaluate_adapter

    # Prepare
    res = sweep["result"]
    cfg = load_config(res.best_config_path, ["eval.data=fineray:support-tickets/test", "eval.max_examples=4",
                                             "eval.max_new_tokens=8", "eval.general_text=null"])
    adapter = AdapterRegistry(str(sweep["root"] / "adapters")).local_path(res.registry_ref)
    # Execute
    metrics = evaluate_adapter(cfg, adapter)
    # Assert
    assert 0.0 <= metrics["field_accuracy"] <= 1.0 and 0.0 <= metrics["json_valid"] <= 1.0
    assert metrics["perplexity"] > 1.0


def test_failing_trials_are_retried_listed_and_do_not_kill_the_sweep(tmp_path: Path, shared_ray) -> None:
    """Each value is valid alone, the combination is not: every trial fails in its own driver, is retried
    once (tune.max_failures) and the sweep still returns, listing the errors and registering nothing."""
    from fineray.train.config import validate_config
    from fineray.tune import run_sweep

    # Prepare
    data = {**SWEEP, "output": {"dir": str(tmp_path / "runs"), "registry": str(tmp_path / "adapters"), "name": "bad"},
            "tune": {"num_samples": 2, "max_failures": 1,
                     "search_space": {"method": {"choice": ["qlora"]}, "train.strategy": {"choice": ["deepspeed"]}}}}
    cfg = validate_config(data)
    # Execute
    res = run_sweep(cfg, progress=False)
    # Assert
    assert [r["status"] for r in res.trials] == ["ERROR", "ERROR"]
    assert [e["trial_id"] for e in res.errors] == [r["trial_id"] for r in res.trials]
    assert all("qlora cannot run with train.strategy=deepspeed" in e["error"] for e in res.errors)
    assert all(r["attempts"] == 2 for r in res.trials)
    assert res.best == {} and res.registry_ref is None and res.best_config_path is None
    assert not (tmp_path / "adapters").exists()
