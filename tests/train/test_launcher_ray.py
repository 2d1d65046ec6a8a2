"""A real 2-worker Ray Train run on the tiny model: loss falls, checkpoint written, registry entry hashed,
and re-running the same run name resumes from its checkpoint instead of starting over."""

import json
from pathlib import Path

import pytest

from fineray.train.config import load_config
from fineray.train.launcher import run_train
from fineray.train.registry import AdapterRegistry, sha256_file

pytestmark = pytest.mark.integration


def test_two_worker_ray_train_run_end_to_end(tmp_path: Path, shared_ray):
    cfg = load_config(None, [
        "model.base=tiny:llama", "train.max_steps=10", "train.eval_every=5", "train.batch_size=4",
        "train.lr=1e-2", "lora.r=8", "scaling.num_workers=2", "cluster.num_cpus=2",
        f"output.dir={tmp_path}/runs", f"output.registry={tmp_path}/adapters", "output.name=tiny-e2e",
        "data.validation=fineray:support-tickets/val", "train.eval_batches=2",
        "eval.data=fineray:support-tickets/test", "eval.max_examples=4", "eval.max_new_tokens=8",
    ])
    summary = run_train(cfg, progress=False)

    run = tmp_path / "runs" / "tiny-e2e"
    assert summary["steps"] == 10 and summary["train_loss_last"] < summary["train_loss_first"]
    assert {"adapter", "config.yaml", "metrics.jsonl", "loss.png", "summary.json"} <= {p.name for p in run.iterdir()}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and "val_loss" in rows[4]
    saved = json.loads((run / "summary.json").read_text())
    for key in ("steps", "wall_s", "tokens_per_s", "train_loss_first", "train_loss_last", "val_loss",
                "base_metrics", "tuned_metrics"):
        assert key in saved
    assert saved["tuned_metrics"]["n"] == 4 and "field_accuracy" in saved["tuned_metrics"]
    assert len([p for p in (run / "ray").glob("checkpoint_*") if p.is_dir()]) == 2  # num_to_keep=2 of the 2 reports with checkpoints

    reg = AdapterRegistry(str(tmp_path / "adapters"))
    v = reg.get("tiny-e2e")
    assert v.version == 1 and reg.verify(v.ref) == []
    assert v.manifest["files"]["adapter_model.safetensors"] == sha256_file(run / "adapter" / "adapter_model.safetensors")
    assert v.manifest["hyperparameters"]["lora"]["r"] == 8 and v.manifest["method"] == "lora"

    # Same run name, more steps: Ray Train V2 restores the latest checkpoint (step 10) and continues.
    cfg.train.max_steps = 12
    cfg.eval.enabled = False
    again = run_train(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert again["steps"] == 12 and [r["step"] for r in rows][-3:] == [10, 11, 12]
    assert reg.get("tiny-e2e").version == 2
