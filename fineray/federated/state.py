"""Federation checkpoints: one folder per completed round, published atomically.

Layout under the federation's state folder (``<run_dir>/federation``)::

    round_000003/
        global_adapter.safetensors    the global adapter after round 3 (PEFT naming)
        residual.safetensors          folded base residual (exact strategies only)
        strategy_state.safetensors    the strategy's server state (e.g. FedAdam's moments), saved and
                                      loaded by the strategy's own ``save_state`` / ``load_state``
        state.json                    round, adapter config, DP accountant, history, evaluations
    LATEST                            "round_000003"

A round folder is written under a temporary name and renamed into place, then ``LATEST`` is replaced
(:func:`fineray.base.storage.atomic_dir` and ``atomic_write_bytes``), so a coordinator killed at any
instant restarts from the last complete round. The two newest round folders are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fineray.base import storage
from fineray.federated.global_model import Residual, residual_from_tensors, residual_to_tensors
from fineray.federated.strategies import AggregationStrategy

__all__ = ["FederationSnapshot", "load_snapshot", "save_snapshot"]

_LATEST = "LATEST"


@dataclass
class FederationSnapshot:
    """Everything needed to resume a federation after its last completed round."""

    round: int
    adapter: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    residual: Residual | None = None
    strategy_state: Any = None
    dp_rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_hash: str = ""


def _contig(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in t.items()}


def save_snapshot(state_dir: str | Path, snap: FederationSnapshot, strategy: AggregationStrategy,
                  keep: int = 2) -> Path:
    """Publishes ``snap`` as ``round_<N>`` and points ``LATEST`` at it.

    Raises:
        TypeError: ``snap`` holds a server state but ``strategy`` declares no ``save_state``.
    """
    root = Path(state_dir)
    name = f"round_{snap.round:06d}"
    with storage.atomic_dir(root / name) as tmp:
        save_file(_contig(snap.adapter), str(tmp / "global_adapter.safetensors"))
        if snap.residual:
            save_file(_contig(residual_to_tensors(snap.residual)), str(tmp / "residual.safetensors"))
        state = {"round": snap.round, "adapter_config": snap.adapter_config, "dp_rounds": snap.dp_rounds,
                 "history": snap.history, "evals": snap.evals, "config_hash": snap.config_hash}
        if snap.strategy_state is not None:
            if strategy.save_state is None:
                raise TypeError(f"strategy {strategy.name!r} returned a server state but declares no save_state")
            tensors, state["strategy_state"] = strategy.save_state(snap.strategy_state)
            save_file(_contig(tensors), str(tmp / "strategy_state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    storage.atomic_write_bytes(*storage.open_fs(str(root / _LATEST)), name.encode())
    rounds = sorted(p for p in root.glob("round_*") if p.is_dir())
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_snapshot(state_dir: str | Path, strategy: AggregationStrategy) -> FederationSnapshot | None:
    """The last published snapshot, or None when the folder holds none (``strategy`` loads its state)."""
    root = Path(state_dir)
    latest = root / _LATEST
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    state = json.loads((folder / "state.json").read_text())
    residual = None
    if (folder / "residual.safetensors").is_file():
        residual = residual_from_tensors(load_file(str(folder / "residual.safetensors")))
    strategy_state = None
    if (folder / "strategy_state.safetensors").is_file() and strategy.load_state is not None:
        strategy_state = strategy.load_state(load_file(str(folder / "strategy_state.safetensors")),
                                             dict(state.get("strategy_state") or {}))
    return FederationSnapshot(
        round=int(state["round"]), adapter=load_file(str(folder / "global_adapter.safetensors")),
        adapter_config=state["adapter_config"], residual=residual, strategy_state=strategy_state,
        dp_rounds=int(state.get("dp_rounds", 0)), history=list(state.get("history", [])),
        evals=dict(state.get("evals", {})), config_hash=state.get("config_hash", ""))
