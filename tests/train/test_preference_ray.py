"""Preference objectives on Ray: DPO through Ray Train with 2 FSDP workers (metrics, both ranks' shards in one
checkpoint, registry lineage, resume), and the reference log-probs of a full fine-tune precomputed in a Ray Data
pass."""

import json
from pathlib import Path

import pytest

from fineray.train.config import load_config
from fineray.train.registry import AdapterRegistry

pytestmark = pytest.mark.integration


def test_dpo_through_ray_train_with_two_fsdp_workers_resumes_and_registers_lineage(tmp_path: Path, shared_ray):
    """Also the suite's FSDP run through Ray Train: each Ray Train fit costs ~25 s of process starts here, so
    the objective and the strategy share one (they are orthogonal: tests/train/test_strategies.py checks DPO
    under FSDP and ZeRO-3 against DDP in-process, and FSDP's resume with equal losses)."""
    from fineray.train.launcher import run_train

    cfg = load_config(None, [
        "model.base=tiny:llama", "objective=dpo", "dpo.beta=0.2", "data.train=fineray:support-pairs",
        "data.validation=fineray:support-pairs/val", "data.max_examples=32", "train.max_steps=4",
        "train.eval_every=2", "train.batch_size=2", "train.eval_batches=2", "train.lr=1e-2", "lora.r=4",
        "train.strategy=fsdp", "train.fsdp.activation_checkpointing=false",
        "scaling.num_workers=2", "cluster.num_cpus=2", f"output.dir={tmp_path}/runs",
        f"output.registry={tmp_path}/adapters", "output.name=tiny-dpo", "eval.enabled=false"])
    summary = run_train(cfg, progress=False)

    run = tmp_path / "runs" / "tiny-dpo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"train_reward_accuracy", "train_reward_margin", "train_kl", "train_logp_chosen"} <= set(rows[0])
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin", "val_kl", "val_logp_rejected"} <= set(rows[1])
    assert summary["val_last"]["val_reward_margin"] == rows[-1]["val_reward_margin"]
    first = min((p for p in (run / "ray").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    shards = {p.name for p in (first / "shards").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= shards  # both ranks' shards, merged by Ray Train
    manifest = AdapterRegistry(str(tmp_path / "adapters")).get("tiny-dpo").manifest
    assert manifest["kind"] == "adapter" and manifest["lineage"]["objective"] == "dpo"
    assert manifest["hyperparameters"]["dpo"]["beta"] == 0.2 and "val_reward_accuracy" in manifest["metrics"]

    cfg.train.max_steps = 6  # same run name: Ray Train restores the step-4 checkpoint and continues
    again = run_train(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert again["steps"] == 6 and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_reference_pass_on_ray_data_equals_the_frozen_model(tmp_path: Path, shared_ray, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from fineray.train.model import load_tokenizer
    from fineray.train.preference import build_pair_data
    from fineray.train.reference import (
        needs_precomputed_reference,
        pair_reference_logps,
        precompute_reference,
    )

    cfg = load_config(None, ["model.base=tiny:llama", "method=full", "objective=dpo",
                             "data.train=fineray:support-pairs", "data.validation=fineray:support-pairs/test",
                             "data.max_examples=6", "scaling.num_workers=1", "train.batch_size=4"])
    assert needs_precomputed_reference(cfg)
    refs = precompute_reference(cfg)
    tok = load_tokenizer(cfg.model, str(tiny_dir))
    train, val = build_pair_data(cfg, tok)
    assert set(refs) == {p.key for p in train + val}
    frozen = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    direct = pair_reference_logps(frozen, train[:3], tok.pad_token_id)
    for p, d in zip(train[:3], direct):
        assert refs[p.key] == pytest.approx(d, rel=1e-5)
        assert d[0] < 0 and d[1] < 0
    assert torch.is_grad_enabled()
