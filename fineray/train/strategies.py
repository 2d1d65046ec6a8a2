"""Data-parallel strategies for the training loop: DDP (default), FSDP2 and DeepSpeed ZeRO-2/3.

The loop stays one top-to-bottom function; what differs per strategy sits behind six calls: `prepare` (wrap the model, build the optimizer), `no_sync`, `backward`, `step` (clip, optimizer step,
zero grads; returns the gradient norm), `save` / `load` (checkpoints) and `report` (Ray report with the
checkpoint).

Checkpoints. DDP writes the adapter or model plus `trainer_state.pt` from rank 0 (`checkpoint.py`). FSDP and
DeepSpeed write *sharded* checkpoints: every rank writes its shard (`shards/` through
`torch.distributed.checkpoint`, or `ds/` through DeepSpeed), rank 0 writes `trainer_state.pt` (scheduler
and loop state) and `metrics.jsonl`, and Ray Train merges the ranks' folders into one checkpoint. A sharded
checkpoint is also consolidated into the normal `adapter/` (PEFT, every checkpoint: it is small) or `model/`
(full fine-tune: the final checkpoint) so the run directory and registry look the same for every strategy;
`strategy_fsdp.consolidate_checkpoint` turns any FSDP shard folder into a `model/` offline (no process group
needed). This module holds DDP and what the strategies share; FSDP is in `strategy_fsdp`, DeepSpeed in
`strategy_deepspeed`. A strategy gets the run's `train:` section, not the whole run config.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fineray.base.storage import atomic_dir
from fineray.train.checkpoint import LoopState, load_checkpoint, save_checkpoint, unwrap
from fineray.train.config import TrainConfig
from fineray.train.session import RaySession, Session

__all__ = ["DDPStrategy", "Strategy", "build_optimizer", "ensure_process_group", "make_strategy"]


def build_optimizer(t: TrainConfig, params: list[torch.nn.Parameter], use_gpu: bool) -> torch.optim.Optimizer:
    """AdamW (fused on GPU), or bitsandbytes' paged 8-bit AdamW (`train.optimizer: paged_adamw_8bit`)."""
    if t.optimizer == "paged_adamw_8bit":
        if not use_gpu:
            raise ValueError("train.optimizer=paged_adamw_8bit needs a CUDA GPU (bitsandbytes paged memory)")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=use_gpu or None)


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group for FSDP/DeepSpeed outside Ray Train (LocalSession)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def is_quantized(p: torch.nn.Parameter) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "peft_config")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def save_consolidated(model: torch.nn.Module, full_sd: dict[str, torch.Tensor], target: Path,
                       base_name: str | None) -> None:
    """Rank 0: write a gathered state dict as a PEFT adapter or a safetensors model folder."""
    m = unwrap(model)
    if hasattr(m, "peft_config"):
        if base_name:
            for pc in m.peft_config.values():
                pc.base_model_name_or_path = base_name
        m.save_pretrained(target / "adapter", state_dict=full_sd, safe_serialization=True)
    else:
        causal_lm(model).save_pretrained(target / "model", state_dict=full_sd, safe_serialization=True)


class Strategy:
    """DDP semantics; subclasses override what differs.

    Args:
        tcfg: the run's `train:` section (optimizer, clipping, precision, `fsdp` / `deepspeed` settings).
        session: the worker's session (device, rank, world size, reporting).
        base_name: `model.base`, recorded in saved adapters.
    """

    name = "ddp"
    sharded = False

    def __init__(self, tcfg: TrainConfig, session: Session, base_name: str | None = None) -> None:
        self.tcfg, self.session, self.base_name = tcfg, session, base_name
        self.use_gpu = session.device.type == "cuda"

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap the model for data parallelism and build the optimizer over its trainable parameters."""
        model = self.session.prepare_model(model)
        self.params = self.trainable(model)
        return model, build_optimizer(self.tcfg, self.params, self.use_gpu)

    params: list[torch.nn.Parameter] | None = None

    @staticmethod
    def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def no_sync(self, model: torch.nn.Module, sync: bool) -> Any:
        """Skip the gradient all-reduce on accumulation micro-steps."""
        return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()

    def backward(self, loss: torch.Tensor, scaler: Any = None) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> float:
        """Clip, step, zero the grads; returns the pre-clip global gradient norm."""
        params = self.params if self.params is not None else self.trainable(model)
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            norm = norm.full_tensor()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, target: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: LoopState,
             final: bool = False) -> None:
        save_checkpoint(target, model, optimizer, scheduler, state, base_name=self.base_name)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        return load_checkpoint(ckpt, model, optimizer, scheduler)

    def report(self, session: Any, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None:
        """Report metrics (every rank); with a sharded strategy every rank contributes checkpoint files."""
        if write is None or not self.sharded or not isinstance(session, RaySession):
            session.report(metrics, write)
            return
        import ray.train

        with tempfile.TemporaryDirectory(prefix="fineray-shard-") as tmp:
            target = Path(tmp) / "ckpt"
            write(target)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)))

    # Sharded strategies write into `target` directly on every rank; a local (one-rank) run writes into a
    # temporary sibling renamed into place, like `save_checkpoint`.
    def write_checkpoint(self, target: Path, write: Callable[[Path], None]) -> None:
        if isinstance(self.session, RaySession):
            target.mkdir(parents=True, exist_ok=True)
            write(target)
            return
        with atomic_dir(target) as tmp:
            write(tmp)


DDPStrategy = Strategy


def make_strategy(tcfg: TrainConfig, session: Session, base_name: str | None = None) -> Strategy:
    """The strategy object for `train.strategy` (see `Strategy` for the arguments)."""
    if tcfg.strategy == "fsdp":
        from fineray.train.strategy_fsdp import FSDPStrategy as cls
    elif tcfg.strategy == "deepspeed":
        from fineray.train.strategy_deepspeed import DeepSpeedStrategy as cls
    else:
        cls = Strategy
    return cls(tcfg, session, base_name)


