"""Strategies: selection, generated DeepSpeed configs, FSDP units, sharded checkpoints, resume (CPU, gloo)."""

import json
from pathlib import Path

import pytest
import torch

from fineray.train.config import load_config
from fineray.train.session import LocalSession
from fineray.train.strategies import Strategy, make_strategy
from fineray.train.strategy_deepspeed import DeepSpeedStrategy, deepspeed_config
from fineray.train.strategy_fsdp import FSDPStrategy, consolidate_checkpoint, fsdp_units

BASE = ["model.base=tiny:llama", "train.batch_size=4", "train.lr=3e-3", "data.validation=null", "lora.r=4",
        "lora.dropout=0", "data.max_examples=64", "train.scheduler=constant", "train.warmup_ratio=0"]


def test_strategy_selection():
    s = LocalSession("/tmp/unused")
    assert type(make_strategy(load_config(None, BASE).train, s)) is Strategy
    assert isinstance(make_strategy(load_config(None, BASE + ["train.strategy=fsdp"]).train, s), FSDPStrategy)
    assert isinstance(make_strategy(load_config(None, BASE + ["train.strategy=deepspeed"]).train, s), DeepSpeedStrategy)


def test_deepspeed_config_per_stage_and_user_merge(tmp_path: Path):
    z2 = deepspeed_config(load_config(None, BASE + ["train.strategy=deepspeed", "train.deepspeed.stage=2",
                                                     "train.grad_accum=3"]).train, world_size=2, use_gpu=True)
    assert z2["zero_optimization"]["stage"] == 2 and "stage3_gather_16bit_weights_on_model_save" not in \
        z2["zero_optimization"]
    assert (z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"], z2["train_batch_size"]) == \
        (4, 3, 24)
    assert z2["bf16"]["enabled"] and not z2["fp16"]["enabled"] and z2["gradient_clipping"] == 1.0
    z3 = deepspeed_config(load_config(None, BASE + ["train.strategy=deepspeed", "train.deepspeed.offload_optimizer=true",
                                                     "train.deepspeed.offload_params=true"]).train, 4, use_gpu=True)
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
    assert deepspeed_config(load_config(None, BASE + ["train.strategy=deepspeed"]).train, 2, use_gpu=False)["bf16"] == \
        {"enabled": False}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "train_batch_size": 999,
                                "steps_per_print": 5}))
    merged = deepspeed_config(load_config(None, BASE + ["train.strategy=deepspeed",
                                                        f"train.deepspeed.config_file={user}"]).train, 2, use_gpu=False)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123 and merged["zero_optimization"]["stage"] == 3
    assert merged["steps_per_print"] == 5 and merged["train_batch_size"] == 8  # batch keys follow the run config


def test_fsdp_units_are_the_blocks_then_the_root():
    from fineray.train.model import load_for_training

    _, model = load_for_training(load_config(None, BASE))
    assert fsdp_units(model) == ["base_model.model.model.layers.0", "base_model.model.model.layers.1", ""]


@pytest.fixture
def process_group():
    """In-process strategies start a one-rank process group; end it (and DeepSpeed's handle on it, which it
    would otherwise reuse in the next test) afterwards."""
    yield
    import sys

    import torch.distributed as dist

    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and ds.cdb is not None:
        if dist.is_initialized():
            ds.destroy_process_group()  # also drops DeepSpeed's cached groups
        ds.cdb = None
    if dist.is_initialized():
        dist.destroy_process_group()


def test_fsdp_in_process_sharded_checkpoint_resume_and_consolidation(tmp_path: Path, process_group):
    from safetensors.torch import load_file

    from fineray.train.loop import train_loop

    cfg = load_config(None, BASE + ["method=full", "train.strategy=fsdp", "train.max_steps=4", "train.eval_every=2",
                                    "train.fsdp.activation_checkpointing=false"])
    full = LocalSession(tmp_path / "a")
    ref = train_loop(cfg, full)
    first, last = full.checkpoints
    assert {p.name for p in first.iterdir()} == {"shards", "trainer_state.pt", "metrics.jsonl"}
    assert (last / "model" / "model.safetensors").is_file()  # the final checkpoint is consolidated
    resumed = train_loop(cfg, LocalSession(tmp_path / "b", resume_from=str(first)))
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed.history[2:]] == pytest.approx(
        [r["train_loss"] for r in ref.history[2:]], rel=1e-5)
    out = consolidate_checkpoint(last, tmp_path / "consolidated", base="tiny:llama")
    offline = load_file(out / "model.safetensors")
    online = load_file(last / "model" / "model.safetensors")
    assert set(offline) == set(online) and len(online) > 10
    for k in online:
        torch.testing.assert_close(offline[k], online[k])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_in_process_checkpoint_resumes_at_the_saved_step(tmp_path: Path, stage: int, process_group):
    """ZeRO-2/3 checkpoints (DeepSpeed's own engine files) load back and training continues with the same
    losses; the two-worker Ray test below checks both ranks' files in one checkpoint."""
    from fineray.train.loop import train_loop

    # Prepare
    cfg = load_config(None, BASE + ["method=full", "train.strategy=deepspeed", f"train.deepspeed.stage={stage}",
                                    "train.max_steps=4", "train.eval_every=2"])
    full = LocalSession(tmp_path / "a")
    ref = train_loop(cfg, full)
    first = full.checkpoints[0]
    # Execute
    resumed = train_loop(cfg, LocalSession(tmp_path / "b", resume_from=str(first)))
    # Assert
    assert any("zero_pp_rank_0" in p.name for p in first.rglob("*"))
    assert (full.checkpoints[-1] / "model" / "model.safetensors").is_file()  # the final one is consolidated
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in resumed.history[2:]] == pytest.approx(
        [r["train_loss"] for r in ref.history[2:]], rel=1e-5)


def test_fsdp_lora_checkpoint_has_the_adapter_and_resumes(tmp_path: Path, process_group):
    import torch.distributed.checkpoint as dcp

    from fineray.train.loop import train_loop

    cfg = load_config(None, BASE + ["train.strategy=fsdp", "train.max_steps=4", "train.eval_every=2",
                                    "train.fsdp.activation_checkpointing=false"])
    s = LocalSession(tmp_path / "a")
    ref = train_loop(cfg, s)
    ck = s.checkpoints[-1]
    assert {p.name for p in (ck / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    from safetensors.torch import load_file

    keys = list(load_file(ck / "adapter" / "adapter_model.safetensors"))
    assert keys and all("lora_" in k for k in keys)
    # the sharded checkpoint holds the trainable tensors only (QLoRA's 4-bit state entries would not load back)
    saved = dcp.FileSystemReader(str(s.checkpoints[0] / "shards")).read_metadata().state_dict_metadata
    assert {k for k in saved if k.startswith("model.")} and all("lora_" in k for k in saved if k.startswith("model."))
    resumed = train_loop(cfg, LocalSession(tmp_path / "b", resume_from=str(s.checkpoints[0])))
    assert [r["train_loss"] for r in resumed.history[2:]] == pytest.approx(
        [r["train_loss"] for r in ref.history[2:]], rel=1e-5)


# ---------------------------------------------------------------------- 2 workers through Ray Train (gloo, CPU)
@pytest.mark.integration
def test_two_zero3_workers_write_both_ranks_files_into_one_checkpoint(tmp_path: Path, shared_ray):
    """Two Ray Train workers under ZeRO-3: both ranks' files land in one checkpoint, consolidated at the end.
    (DeepSpeed's resume runs in-process above, ZeRO-2 and ZeRO-3; FSDP through Ray Train, with resume, is the
    DPO test in tests/train/test_preference_ray.py; ZeRO-2/3 resumes on 2 x H200 are in RESULTS.md.)"""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from fineray.train.loop import ray_worker_entry

    # Prepare
    cfg = load_config(None, BASE + ["method=full", "train.strategy=deepspeed", "train.deepspeed.stage=3",
                                    "train.max_steps=4", "train.eval_every=2", "scaling.num_workers=2"])
    trainer = TorchTrainer(
        ray_worker_entry, train_loop_config={"run": cfg.to_dict()}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="ray", storage_path=str(tmp_path),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    # Execute (on the shared test Ray)
    res = trainer.fit()
    # Assert
    with res.checkpoint.as_directory() as d:
        hist = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert (Path(d) / "model" / "model.safetensors").is_file()  # consolidated at the end
    assert [r["step"] for r in hist] == [1, 2, 3, 4] and hist[-1]["train_loss"] < hist[0]["train_loss"]
    first = min(res.best_checkpoints, key=lambda c: c[1]["step"])
    assert first[1]["step"] == 2
    with first[0].as_directory() as d:
        names = {p.name for p in Path(d).rglob("*") if p.is_file()}
    assert any("zero_pp_rank_1" in n for n in names) and any("zero_pp_rank_0" in n for n in names)


@pytest.mark.parametrize("strategy,method", [("fsdp", "lora"), ("deepspeed", "full")])
def test_dpo_under_sharded_strategies_matches_ddp(tmp_path: Path, strategy: str, method: str, process_group):
    """The objective is orthogonal to the strategy: DPO (LoRA: adapter-disabled reference through FSDP; full:
    the reference precomputed through a ZeRO-3 model) computes the same losses as under DDP."""
    from fineray.train.loop import train_loop

    pref = ["objective=dpo", "data.train=fineray:support-pairs", "data.validation=fineray:support-pairs/val",
            "data.max_examples=8", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1",
            f"method={method}", "train.lr=1e-3"]
    ddp = train_loop(load_config(None, BASE + pref), LocalSession(tmp_path / "ddp"))
    extra = ["train.fsdp.activation_checkpointing=false"] if strategy == "fsdp" else ["train.deepspeed.stage=3"]
    sharded = train_loop(load_config(None, BASE + pref + [f"train.strategy={strategy}", *extra]),
                         LocalSession(tmp_path / strategy))
    for key in ("train_loss", "train_reward_margin"):
        assert [r[key] for r in sharded.history] == pytest.approx([r[key] for r in ddp.history], rel=1e-3, abs=1e-5)
    assert sharded.history[-1]["val_reward_accuracy"] == ddp.history[-1]["val_reward_accuracy"]
