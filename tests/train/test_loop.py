"""The training loop in-process (LocalSession): loss falls, checkpoint round trip, exact resume, NaN stop."""

from pathlib import Path

import pytest
import torch

from fineray.train.checkpoint import load_checkpoint
from fineray.train.config import load_config
from fineray.train.loop import make_scheduler, train_loop
from fineray.train.session import LocalSession

BASE = ["model.base=tiny:llama", "train.batch_size=4", "train.lr=3e-3", "data.validation=0.05",
        "train.eval_batches=2", "lora.r=8"]


def _cfg(*extra: str):
    return load_config(None, BASE + list(extra))


def test_loss_falls_and_checkpoints_are_complete(tmp_path: Path):
    cfg = _cfg("train.max_steps=12", "train.eval_every=6", "train.lr=1e-2")
    session = LocalSession(tmp_path)
    state = train_loop(cfg, session)
    losses = [r["train_loss"] for r in state.history]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1
    assert [c.name for c in session.checkpoints] == ["checkpoint_000006", "checkpoint_000012"]
    ck = session.checkpoints[-1]
    assert {p.name for p in (ck / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (ck / "trainer_state.pt").is_file() and len((ck / "metrics.jsonl").read_text().splitlines()) == 12
    assert session.reports[-1]["done"] is True and "val_loss" in session.reports[-1]


def test_checkpoint_round_trip_restores_weights_and_state(tmp_path: Path):
    from fineray.train.model import load_for_training

    cfg = _cfg("train.max_steps=4", "train.eval_every=4")
    session = LocalSession(tmp_path)
    train_loop(cfg, session)
    ck = session.checkpoints[-1]
    _, fresh = load_for_training(cfg)
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1.0)
    sched = make_scheduler(opt, "cosine", 0, 4)
    state = load_checkpoint(ck, fresh, opt, sched)
    from safetensors.torch import load_file

    saved = load_file(ck / "adapter" / "adapter_model.safetensors")
    lora_b = {n: p for n, p in fresh.named_parameters() if "lora_B" in n}
    some = next(iter(lora_b))
    key = some.replace(".default", "")
    assert torch.equal(lora_b[some].detach(), saved[key])
    assert state.step == 4 and len(state.history) == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])


def test_resume_continues_at_saved_step_with_same_losses(tmp_path: Path):
    cfg = _cfg("train.max_steps=6", "train.eval_every=3", "lora.dropout=0.1")
    full = LocalSession(tmp_path / "a")
    ref = train_loop(cfg, full)
    resumed = LocalSession(tmp_path / "b", resume_from=str(full.checkpoints[0]))
    out = train_loop(cfg, resumed)
    assert [r["step"] for r in out.history] == [1, 2, 3, 4, 5, 6]
    ref_losses = [r["train_loss"] for r in ref.history[3:]]
    new_losses = [r["train_loss"] for r in out.history[3:]]
    assert new_losses == pytest.approx(ref_losses, rel=1e-5)


def test_nan_loss_stops_with_diverged(tmp_path: Path):
    cfg = _cfg("train.max_steps=50", "train.lr=1e30", "train.grad_clip=null", "train.eval_every=100",
               "train.scheduler=constant", "train.warmup_ratio=0")
    session = LocalSession(tmp_path)
    state = train_loop(cfg, session)
    assert session.reports[-1]["stop_reason"] == "diverged"
    assert state.step < 50


def test_early_stopping_stops_before_max_steps(tmp_path: Path):
    cfg = _cfg("train.max_steps=40", "train.eval_every=1", "train.early_stopping_patience=1",
               "train.lr=1e-7", "train.scheduler=constant", "train.warmup_ratio=0")
    session = LocalSession(tmp_path)
    state = train_loop(cfg, session)
    assert state.step < 40 and session.reports[-1]["stop_reason"] == "early_stopping"


def test_scheduler_shapes():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = make_scheduler(opt, "linear", 2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(s.get_last_lr()[0])
        opt.step()
        s.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.125)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_micro_batch_tokens_gives_the_same_training(tmp_path: Path, packing: str):
    # Prepare: the same run twice, the second splitting each micro-batch into chunks of <= 48 tokens
    common = ("train.max_steps=3", "train.eval_every=100", "lora.dropout=0", "train.grad_clip=null",
              "data.validation=null", f"data.packing={packing}", "train.fast.packing_attention=sdpa")
    plain, split = LocalSession(tmp_path / "plain"), LocalSession(tmp_path / "split")
    # Execute
    ref = train_loop(_cfg(*common), plain)
    out = train_loop(_cfg(*common, "train.micro_batch_tokens=48"), split)
    # Assert: same losses, same adapter weights (token-weighted chunk losses = the micro-batch's mean loss)
    from safetensors.torch import load_file

    assert [r["train_loss"] for r in out.history] == pytest.approx([r["train_loss"] for r in ref.history], rel=1e-4)
    a = load_file(plain.checkpoints[-1] / "adapter" / "adapter_model.safetensors")
    b = load_file(split.checkpoints[-1] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
