"""Training checkpoints: the adapter (or full model), optimizer, scheduler, loop position and history.

Layout of a checkpoint directory:
    adapter/            PEFT adapter (adapter_config.json, adapter_model.safetensors), or
    model/              full model weights (method=full), safetensors
    trainer_state.pt    optimizer + scheduler state dicts and the loop state (step, epoch, batch position)
    metrics.jsonl       the metric history up to this step
Writes go to a temporary sibling folder that is renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fineray.base.storage import atomic_dir

__all__ = ["LoopState", "load_checkpoint", "read_loop_state", "save_checkpoint", "save_weights", "unwrap",
           "write_jsonl", "write_loop_state"]


@dataclass
class LoopState:
    """Where the loop is: optimizer steps done, epoch, micro-batches consumed in that epoch, early stopping."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = float("inf")
    bad_evals: int = 0
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_weights(model: torch.nn.Module, out: Path, base_name: str | None = None) -> Path:
    """Save a PEFT adapter to `out/adapter` or full weights to `out/model`; returns that folder."""
    m = unwrap(model)
    if hasattr(m, "peft_config"):
        target = out / "adapter"
        if base_name:
            for pc in m.peft_config.values():
                pc.base_model_name_or_path = base_name  # portable: the spec, not a cache path
        m.save_pretrained(target, safe_serialization=True)
    else:
        target = out / "model"
        m.save_pretrained(target, safe_serialization=True)
    return target


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_loop_state(target: Path, scheduler: Any, state: LoopState, **extra: Any) -> None:
    """`trainer_state.pt` (scheduler, loop state and `extra`, e.g. the optimizer's state) and `metrics.jsonl`."""
    torch.save({"scheduler": scheduler.state_dict(), **extra,
                "state": {k: v for k, v in asdict(state).items() if k != "history"}}, target / "trainer_state.pt")
    write_jsonl(target / "metrics.jsonl", state.history)


def read_loop_state(ckpt: Path, scheduler: Any | None, optimizer: torch.optim.Optimizer | None = None) -> LoopState:
    """Inverse of `write_loop_state`: restores the scheduler (and optimizer) in place, returns the loop state."""
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    state = LoopState(**blob["state"])
    hist = ckpt / "metrics.jsonl"
    if hist.exists():
        state.history = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
    return state


def save_checkpoint(out: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: LoopState, base_name: str | None = None) -> Path:
    """Write a complete checkpoint to `out` atomically (temp folder + rename)."""
    with atomic_dir(out) as tmp:
        save_weights(model, tmp, base_name)
        write_loop_state(tmp, scheduler, state, optimizer=optimizer.state_dict())
    return Path(out)


def load_checkpoint(ckpt: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None) -> LoopState:
    """Restore weights (in place), optimizer and scheduler from a checkpoint; return the loop state."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    m = unwrap(model)
    if (ckpt / "adapter").is_dir():
        from peft import set_peft_model_state_dict

        weights = load_file(ckpt / "adapter" / "adapter_model.safetensors")
        result = set_peft_model_state_dict(m, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {ckpt}: adapter keys do not match the model: {result.unexpected_keys[:3]}")
    else:  # save_pretrained's files: model.safetensors, or shards model-0000k-of-0000n.safetensors
        files = sorted((ckpt / "model").glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"checkpoint {ckpt}: neither adapter/ nor model/*.safetensors")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(f))
        m.load_state_dict(weights, strict=False)  # tied weights are saved once
    return read_loop_state(ckpt, scheduler, optimizer)
