"""PyTorch FSDP2 for the training loop (`train.strategy: fsdp`): one `fully_shard` per decoder block plus the
root, sharded `torch.distributed.checkpoint` checkpoints, and offline consolidation of a shard folder."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from fineray.train.checkpoint import LoopState, read_loop_state, write_loop_state
from fineray.train.strategies import (
    Strategy,
    build_optimizer,
    causal_lm,
    ensure_process_group,
    is_peft,
    is_quantized,
    save_consolidated,
)

__all__ = ["FSDPStrategy", "consolidate_checkpoint", "fsdp_units"]


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

        fc, dev = self.tcfg.fsdp, self.session.device
        ensure_process_group(dev)
        mesh = init_device_mesh(dev.type, (self.session.world_size,))
        lm = causal_lm(model)
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
        quant = {p for p in model.parameters() if is_quantized(p)}
        for name in fsdp_units(model):  # the blocks, then the root (last: its group is what is left)
            unit = model.get_submodule(name)
            ignored = quant & set(unit.parameters())
            fully_shard(unit, **kw, **({"ignored_params": ignored} if ignored else {}))
        for mod in model.modules():  # FSDP moves parameters; buffers (rotary tables) follow here
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != dev:
                    mod._buffers[name] = buf.to(dev)
        self.params = self.trainable(model)
        return model, build_optimizer(self.tcfg, self.params, self.use_gpu)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> Any:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _options(self, model: torch.nn.Module, full: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        peft = is_peft(model)
        return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=peft, strict=not peft)

    @staticmethod
    def _trainable_only(model: torch.nn.Module, msd: dict[str, Any]) -> dict[str, Any]:
        # An adapter run checkpoints its trainable tensors only. `ignore_frozen_params` drops frozen
        # parameters, but bitsandbytes' 4-bit layers add non-parameter entries (absmax, quant_map,
        # quant_state...) to the state dict, which a fresh QLoRA model cannot load back.
        if not is_peft(model):
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
            if is_peft(model) or final:
                full = get_model_state_dict(model, options=self._options(model, True))  # collective
                if self.session.rank == 0:
                    save_consolidated(model, full, out, self.base_name)
            if self.session.rank == 0:
                write_loop_state(out, scheduler, state, strategy=self.name)

        self.write_checkpoint(target, write)

    def load(self, ckpt: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt = Path(ckpt)
        msd, osd = get_state_dict(model, optimizer, options=self._options(model, False))
        blob = {"model": self._trainable_only(model, msd), "optim": osd}
        dcp.load(blob, checkpoint_id=str(ckpt / "shards"))
        set_state_dict(model, optimizer, model_state_dict=blob["model"], optim_state_dict=blob["optim"],
                       options=self._options(model, False))
        return read_loop_state(ckpt, scheduler)


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
    sd = dict(blob["model"])
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
