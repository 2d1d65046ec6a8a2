"""End of a federation (simulated or networked): export, register, write the run folder.

Run folder (``output.dir/output.name``)::

    config.yaml       the resolved run config
    federation/       per-round checkpoints (see :mod:`.state`)
    adapter/          the final global model as a plain PEFT folder (residual folded in exactly)
    rounds.jsonl      one row per round, with the new global adapter's evaluation
    curves.png        loss per round (+ epsilon with DP)
    summary.json      :class:`~fineray.federated.report.FederationResult`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fineray.base.runs import default_run_name, registry_name
from fineray.federated.config import FederatedConfig
from fineray.federated.global_model import write_adapter_dir
from fineray.federated.report import FederationResult, plot_curves, version_eval
from fineray.train.config import RunConfig

__all__ = ["check_run_config", "federation_run_dir", "finalize"]


def check_run_config(cfg: RunConfig, fcfg: FederatedConfig) -> None:
    """Run-config rules of a federation (the federated section itself is checked by its model).

    Raises:
        ConfigError: ``method`` other than lora/qlora, or qlora with a strategy that changes base weights.
    """
    from fineray.train.config import ConfigError

    if cfg.method not in ("lora", "qlora"):
        raise ConfigError(f"invalid config: method={cfg.method!r}; federated fine-tuning aggregates LoRA "
                          "adapters, use method: lora (or qlora)")
    folds = fcfg.strategy in ("fedex_lora", "flora") or bool(fcfg.strategy_options.get("keep_residual"))
    if cfg.method == "qlora" and folds:
        raise ConfigError(f"invalid config: federated.strategy={fcfg.strategy!r} folds a residual into the base "
                          "weights, which a 4-bit (qlora) base cannot hold; use method: lora")


def federation_run_dir(cfg: RunConfig, fcfg: FederatedConfig) -> Path:
    """``output.dir/output.name``; the name defaults to ``federated-<strategy>-<timestamp>``."""
    if not cfg.output.name:
        cfg.output.name = default_run_name("federated", strategy=fcfg.strategy)
    run_dir = Path(cfg.output.dir).expanduser().resolve() / cfg.output.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def finalize(cfg: RunConfig, fcfg: FederatedConfig, fed: Any, run_dir: Path, *, comparison: list[dict[str, Any]] | None,
             wall_s: float) -> FederationResult:
    """Exports the global adapter, registers it, writes ``rounds.jsonl``, ``curves.png``, ``summary.json``."""
    import json

    silos = [s.name for s in fcfg.silos]
    rows = []
    for row in fed.history:
        rows.append({**row, "eval": version_eval(fed.evals, row["round"], silos)})
    tensors, config = fed.export()
    adapter_dir = write_adapter_dir(run_dir / "adapter", tensors, config)
    result = FederationResult(
        name=cfg.output.name, run_dir=str(run_dir), strategy=fcfg.strategy, silos=silos, rounds=rows,
        initial_eval=version_eval(fed.evals, 0, silos), comparison=comparison or [], epsilon=fed.epsilon(),
        delta=fcfg.dp.delta if fcfg.dp.enabled else None, adapter_dir=str(adapter_dir), wall_s=round(wall_s, 2))
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    png = plot_curves(result, run_dir / "curves.png")
    result.curves_png = str(png) if png else None
    if cfg.output.register_adapter:
        from fineray.train.registry import AdapterRegistry

        final = rows[-1]["eval"] if rows else result.initial_eval
        metrics = {"val_loss": final.get("mean_val"), "held_out_loss": final.get("held_out"),
                   "rounds": len(rows), "epsilon": result.epsilon}
        lineage = {"federation": {"silos": silos, "rounds": len(rows), "strategy": fcfg.strategy,
                                  "secure_aggregation": fcfg.secure_aggregation.enabled,
                                  "dp": ({"epsilon": result.epsilon, "delta": fcfg.dp.delta,
                                          "noise_multiplier": fcfg.dp.noise_multiplier,
                                          "clip_norm": fcfg.dp.clip_norm} if fcfg.dp.enabled else None),
                                  "residual_folded": bool(fed.residual), "run_dir": str(run_dir)}}
        hp = {"lora": cfg.lora.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
              "federated": fcfg.model_dump(mode="json", exclude={"silos"})}
        version = AdapterRegistry(cfg.output.registry).register(
            registry_name(cfg.output.name, "federated"), adapter_dir, base_model=cfg.model.base, method="lora", hyperparameters=hp,
            metrics=metrics, lineage=lineage)
        result.registry_ref = version.ref
    result.write(run_dir / "summary.json")
    return result
