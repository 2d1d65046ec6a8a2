"""Where the training loop runs: inside a Ray Train worker, or in this process (single worker).

The loop talks to a `Session` for rank, device, checkpoints and reports, so the same top-to-bottom loop runs
under Ray Train (`RaySession`) and in-process for quick checks and unit tests (`LocalSession`, world size 1).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["LocalSession", "RaySession", "Session"]


class Session:
    """What the loop needs from its runtime."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    def get_checkpoint(self) -> str | None:
        """Directory of the checkpoint to resume from, or None."""
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and wrap for data parallelism."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], write_checkpoint: Callable[[Path], None] | None = None) -> None:
        """Report metrics; rank 0 writes the checkpoint into the folder it is given. Called on every rank."""
        raise NotImplementedError

    def progress(self, row: dict[str, Any]) -> None:
        """Live progress from rank 0 (no-op unless a progress board is attached)."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (identity with one worker)."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


class LocalSession(Session):
    """One worker in this process; checkpoints go to `ckpt_root/checkpoint_<step>`."""

    def __init__(self, ckpt_root: str | Path, resume_from: str | None = None, device: str = "cpu",
                 on_report: Callable[[dict[str, Any]], None] | None = None):
        self.ckpt_root = Path(ckpt_root)
        self.resume_from = resume_from
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        self._on_report = on_report

    def get_checkpoint(self) -> str | None:
        return self.resume_from

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], write_checkpoint: Callable[[Path], None] | None = None) -> None:
        self.reports.append(dict(metrics))
        if write_checkpoint is not None:
            target = self.ckpt_root / f"checkpoint_{int(metrics.get('step', len(self.reports))):06d}"
            write_checkpoint(target)
            self.checkpoints.append(target)
        if self._on_report:
            self._on_report(metrics)


class RaySession(Session):
    """A Ray Train worker (DDP over gloo on CPU, NCCL on GPU)."""

    def __init__(self, board: Any | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.board = board
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.device = ray.train.torch.get_device()

    def progress(self, row: dict[str, Any]) -> None:
        if self.board is not None:
            self.board.push.remote(row)

    def get_checkpoint(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Local filesystem checkpoints are used in place; remote ones (s3://) are downloaded once per worker.
        return ckpt.to_directory()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Frozen base parameters would make DDP hunt for unused params; LoRA trains every adapter param.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def report(self, metrics: dict[str, Any], write_checkpoint: Callable[[Path], None] | None = None) -> None:
        import ray.train

        if write_checkpoint is not None and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="fineray-ckpt-") as tmp:
                target = Path(tmp) / "ckpt"
                write_checkpoint(target)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)))
        else:
            ray.train.report(metrics)
