"""Data-parallel strategies for the training loop: DDP (default), FSDP2 and DeepSpeed ZeRO-2/3.

The loop stays one top-to-bottom function; what differs per strategy sits behind six calls:
`prepare` (wrap the model, build the optimizer), `no_sync`, `backward`, `step` (clip, optimizer step,
zero grads; returns the gradient norm), `save` / `load` (checkpoints) and `report` (Ray report with the
checkpoint).

Checkpoints. DDP writes the adapter or model plus `trainer_state.pt` from rank 0 (`checkpoint.py`). FSDP and
DeepSpeed write *sharded* checkpoints: every rank writes its shard (`shards/` through
`torch.distributed.checkpoint`, or `ds/` through DeepSpeed), rank 0 writes `trainer_state.pt` (scheduler
and loop state) and `metrics.jsonl`, and Ray Train merges the ranks' folders into one checkpoint. A sharded
checkpoint is also consolidated into the normal `adapter/` (PEFT, every checkpoint: it is small) or `model/`
(full fine-tune: the final checkpoint) so the run directory and registry look the same for every strategy;
`consolidate_checkpoint` turns any FSDP shard folder into a `model/` offline (no process group needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fineray.train.checkpoint import LoopState, load_checkpoint, save_checkpoint, unwrap, write_jsonl

__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "Strategy",
    "build_optimizer",
    "consolidate_checkpoint",
    "deepspeed_config",
    "ensure_process_group",
    "fsdp_units",
    "make_strategy",
]


def build_optimizer(cfg: Any, params: list[torch.nn.Parameter], use_gpu: bool) -> torch.optim.Optimizer:
    """AdamW (fused on GPU), or bitsandbytes' paged 8-bit AdamW (`train.optimizer: paged_adamw_8bit`)."""
    t = cfg.train
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


def _is_quantized(p: torch.nn.Parameter) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "peft_config")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    m = unwrap(model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def _write_common(target: Path, scheduler: Any, state: LoopState, strategy: str) -> None:
    torch.save({"scheduler": scheduler.state_dict(), "strategy": strategy,
                "state": {k: v for k, v in asdict(state).items() if k != "history"}}, target / "trainer_state.pt")
    write_jsonl(target / "metrics.jsonl", state.history)


def _read_common(ckpt: Path, scheduler: Any) -> LoopState:
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    state = LoopState(**blob["state"])
    hist = ckpt / "metrics.jsonl"
    if hist.exists():
        state.history = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()]
    return state


def _save_consolidated(model: torch.nn.Module, full_sd: dict[str, torch.Tensor], target: Path,
                       base_name: str | None) -> None:
    """Rank 0: write a gathered state dict as a PEFT adapter or a safetensors model folder."""
    m = unwrap(model)
    if hasattr(m, "peft_config"):
        if base_name:
            for pc in m.peft_config.values():
                pc.base_model_name_or_path = base_name
        m.save_pretrained(target / "adapter", state_dict=full_sd, safe_serialization=True)
    else:
        _causal_lm(model).save_pretrained(target / "model", state_dict=full_sd, safe_serialization=True)


class Strategy:
    """DDP semantics; subclasses override what differs."""

    name = "ddp"
    sharded = False

    def __init__(self, cfg: Any, session: Any) -> None:
        self.cfg, self.session = cfg, session
        self.use_gpu = session.device.type == "cuda"

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap the model for data parallelism and build the optimizer over its trainable parameters."""
        model = self.session.prepare_model(model)
        self.params = self.trainable(model)
        return model, build_optimizer(self.cfg, self.params, self.use_gpu)

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
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or float("inf"))
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
        save_checkpoint(target, model, optimizer, scheduler, state, base_name=self.cfg.model.base)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        return load_checkpoint(ckpt, model, optimizer, scheduler)

    def report(self, session: Any, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None:
        """Report metrics (every rank); with a sharded strategy every rank contributes checkpoint files."""
        from fineray.train.session import RaySession

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
    def _atomic(self, target: Path, write: Callable[[Path], None]) -> None:
        from fineray.train.session import RaySession

        if isinstance(self.session, RaySession):
            target.mkdir(parents=True, exist_ok=True)
            write(target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


DDPStrategy = Strategy


def fsdp_units(model: torch.nn.Module) -> list[str]:
    """Qualified names of the modules FSDP shards as one unit each: every decoder block, then the root
    (embeddings, final norm and output head form the root's group)."""
    from fineray.train.fastpath import decoder_layers

    blocks = {id(b) for b in decoder_layers(model)}
    return [n for n, m in model.named_modules() if id(m) in blocks] + [""]


class FSDPStrategy(Strategy):
    """PyTorch FSDP2 full shard: one `fully_shard` per decoder block plus the root; bf16 compute with fp32
    master weights and fp32 gradient reduction on GPU; activation checkpointing per block. QLoRA's 4-bit
    base weights are not sharded (FSDP cannot split packed 4-bit storage): they stay replicated, the
    adapter and the bf16 leftovers are sharded."""

    name = "fsdp"
    sharded = True

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from fineray.train.fastpath import decoder_layers

        fc, dev = self.cfg.train.fsdp, self.session.device
        ensure_process_group(dev)
        mesh = init_device_mesh(dev.type, (self.session.world_size,))
        lm = _causal_lm(model)
        if fc.activation_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mp = MixedPrecisionPolicy()
        if fc.mixed_precision and self.use_gpu:
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()  # fp32 master weights in the shards, bf16 in the all-gathered copy
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp,
                              "offload_policy": CPUOffloadPolicy() if fc.cpu_offload else OffloadPolicy(),
                              "reshard_after_forward": fc.reshard_after_forward}
        quant = {p for p in model.parameters() if _is_quantized(p)}
        for block in decoder_layers(model):
            ignored = quant & set(block.parameters())
            fully_shard(block, **kw, **({"ignored_params": ignored} if ignored else {}))
        fully_shard(model, **kw, **({"ignored_params": quant} if quant else {}))
        for mod in model.modules():  # FSDP moves parameters; buffers (rotary tables) follow here
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != dev:
                    mod._buffers[name] = buf.to(dev)
        self.params = self.trainable(model)
        return model, build_optimizer(self.cfg, self.params, self.use_gpu)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> Any:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _options(self, model: torch.nn.Module, full: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        peft = _is_peft(model)
        return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=peft, strict=not peft)

    @staticmethod
    def _trainable_only(model: torch.nn.Module, msd: dict[str, Any]) -> dict[str, Any]:
        # An adapter run checkpoints its trainable tensors only. `ignore_frozen_params` drops frozen
        # parameters, but bitsandbytes' 4-bit layers add non-parameter entries (absmax, quant_map,
        # quant_state...) to the state dict, which a fresh QLoRA model cannot load back.
        if not _is_peft(model):
            return msd
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in msd.items() if k in keep}

    def save(self, target: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: LoopState,
             final: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        def write(out: Path) -> None:
            msd, osd = get_state_dict(model, optimizer, options=self._options(model, False))
            dcp.save({"model": self._trainable_only(model, msd), "optim": osd}, checkpoint_id=str(out / "shards"))
            if _is_peft(model) or final:
                full = get_model_state_dict(model, options=self._options(model, True))  # collective
                if self.session.rank == 0:
                    _save_consolidated(model, full, out, self.cfg.model.base)
            if self.session.rank == 0:
                _write_common(out, scheduler, state, self.name)

        self._atomic(target, write)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt = Path(ckpt)
        msd, osd = get_state_dict(model, optimizer, options=self._options(model, False))
        blob = {"model": self._trainable_only(model, msd), "optim": osd}
        dcp.load(blob, checkpoint_id=str(ckpt / "shards"))
        set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optim"],
                       options=self._options(model, False))
        return _read_common(ckpt, scheduler)


def deepspeed_config(cfg: Any, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run: generated from `train.*`, with `train.deepspeed.config_file`
    merged on top (the user's keys win, except the batch-size keys, which must match the run config)."""
    t, ds = cfg.train, cfg.train.deepspeed
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


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3 (optional CPU offload). DeepSpeed owns gradient accumulation boundaries, clipping
    and the optimizer step; fineray's LR scheduler drives the optimizer's param groups."""

    name = "deepspeed"
    sharded = True

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        import deepspeed

        ensure_process_group(self.session.device)
        self.ds_config = deepspeed_config(self.cfg, self.session.world_size, self.use_gpu)
        params = self.trainable(model)
        client = None if "optimizer" in self.ds_config else build_optimizer(self.cfg, params, self.use_gpu)
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
        peft = _is_peft(self.engine.module)

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
                    _save_consolidated(self.engine.module, full, out, self.cfg.model.base)
            if self.session.rank == 0:
                _write_common(out, scheduler, state, self.name)

        self._atomic(target, write)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        ckpt = Path(ckpt)
        self.engine.load_checkpoint(str(ckpt / "ds"), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        return _read_common(ckpt, scheduler)


def make_strategy(cfg: Any, session: Any) -> Strategy:
    """The strategy object for `train.strategy`."""
    kind = cfg.train.strategy
    return {"ddp": Strategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}[kind](cfg, session)


def consolidate_checkpoint(ckpt: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Turn an FSDP checkpoint's `shards/` into a safetensors model folder offline (no process group).

    Args:
        ckpt: checkpoint folder holding `shards/` (torch.distributed.checkpoint format).
        out: output folder for `model.safetensors` + `config.json`.
        base: the base model spec (for the config); default the run's `model.base` when known.
    Returns:
        `out`. PEFT checkpoints already carry the consolidated `adapter/` and need no consolidation.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt, out = Path(ckpt), Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt / "shards"), f"{tmp}/full.pt")
        blob = torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=False)
    sd = {k: v for k, v in blob["model"].items()}
    from transformers import AutoConfig, AutoModelForCausalLM

    from fineray.train.model import resolve_base

    if base is None:
        raise ValueError("consolidate_checkpoint needs base= (the model.base of the run) for the config")
    config = AutoConfig.from_pretrained(resolve_base(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    return out
