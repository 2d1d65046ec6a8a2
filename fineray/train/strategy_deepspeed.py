"""DeepSpeed ZeRO-2/3 for the training loop (`train.strategy: deepspeed`): the generated JSON config (with the
user's `train.deepspeed.config_file` merged on top) and the strategy that hands the step to DeepSpeed's engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from fineray.train.checkpoint import LoopState, read_loop_state, write_loop_state
from fineray.train.config import TrainConfig
from fineray.train.strategies import (
    Strategy,
    build_optimizer,
    ensure_process_group,
    is_peft,
    save_consolidated,
)

__all__ = ["DeepSpeedStrategy", "deepspeed_config"]


def deepspeed_config(t: TrainConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run: generated from `train.*`, with `train.deepspeed.config_file`
    merged on top (the user's keys win, except the batch-size keys, which must match the run config)."""
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage, "contiguous_gradients": True, "overlap_comm": use_gpu,
                            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if ds.stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
                     "stage3_max_live_parameters": 1_000_000_000})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    half = t.precision if t.precision != "auto" else ("bf16" if use_gpu else "fp32")
    conf: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": use_gpu and half == "bf16"},
        "fp16": {"enabled": use_gpu and half == "fp16"},
        "gradient_clipping": t.grad_clip or 0.0,
        # fineray's own torch AdamW is handed to DeepSpeed (no JIT-built fused/CPU Adam needed).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config_file:
        conf = _deep_merge(conf, json.loads(Path(ds.config_file).expanduser().read_text()))
    conf.update({"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
                 "train_batch_size": t.batch_size * t.grad_accum * world_size})
    return conf


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce op at communicator start.

    Only DeepSpeed's inference all-reduce uses that op (training collectives go through gloo), and building it
    costs a C++ compiler and ~50 s on a 2-core machine, the first time on every fresh machine.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3 (optional CPU offload). DeepSpeed owns gradient accumulation boundaries, clipping
    and the optimizer step; fineray's LR scheduler drives the optimizer's param groups."""

    name = "deepspeed"
    sharded = True

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        import deepspeed

        ensure_process_group(self.session.device)
        if not self.use_gpu:
            _skip_cpu_shm_comm_build()
        self.ds_config = deepspeed_config(self.tcfg, self.session.world_size, self.use_gpu)
        params = self.trainable(model)
        client = None if "optimizer" in self.ds_config else build_optimizer(self.tcfg, params, self.use_gpu)
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=client, model_parameters=params,
                                                    config=self.ds_config, dist_init_required=False)
        self.engine = engine
        return engine, client if client is not None else (engine.basic_optimizer or ds_opt)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> Any:
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary

    def backward(self, loss: torch.Tensor, scaler: Any = None) -> None:
        # The loop already divides by grad_accum. `engine.step()` is called on every micro-batch: DeepSpeed
        # counts micro-steps and only steps the optimizer (and clips) at the accumulation boundary.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, model: torch.nn.Module, optimizer: Any, scaler: Any = None) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, target: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: LoopState,
             final: bool = False) -> None:
        peft = is_peft(self.engine.module)

        def write(out: Path) -> None:
            (out / "ds").mkdir(parents=True, exist_ok=True)
            self.engine.save_checkpoint(str(out / "ds"), tag="state", save_latest=False,
                                        exclude_frozen_parameters=peft)
            if peft or final:
                if self.ds_config["zero_optimization"]["stage"] == 3:
                    full = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=peft)
                else:
                    full = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
                if self.session.rank == 0:
                    save_consolidated(self.engine.module, full, out, self.base_name)
            if self.session.rank == 0:
                write_loop_state(out, scheduler, state, strategy=self.name)

        self.write_checkpoint(target, write)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        ckpt = Path(ckpt)
        self.engine.load_checkpoint(str(ckpt / "ds"), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        return read_loop_state(ckpt, scheduler)
