"""The end of a sweep: trial records, the best trial (or Pareto front), best_config.yaml, the registered
adapter, optimisation plots, and the printed table."""

from __future__ import annotations

import logging
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fineray.base import storage
from fineray.base.runs import model_stem, run_stem
from fineray.train.config import RunConfig
from fineray.tune.config import Distribution, TuneConfig
from fineray.tune.trainable import LOOP_DONE, trial_config, weights_dir

__all__ = [
    "SweepResult",
    "default_registry_name",
    "pareto_front",
    "pick_best",
    "print_sweep",
    "register_best",
    "trial_records",
    "write_best_config",
    "write_plots",
]

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        run_dir: the sweep folder (a local Path, or the storage URI string).
        name: the sweep id (folder name).
        metrics / modes: the objectives and their directions.
        trials: one record per trial: trial_id, status (TERMINATED / ERROR), early_stopped, params,
            metrics (objective name -> last reported value), step, iterations, wall_s, attempts, error,
            checkpoint_path.
        best: the best trial's record ({} when no trial reported the objective).
        pareto: the non-dominated trials of a multi-objective sweep (the best one alone otherwise).
        best_config_path: a plain run config (no tune section) with the best parameters.
        registry_ref: the registered adapter of the best trial (`name@vN`), or None.
        errors: [{trial_id, params, error}] for trials that failed after their retries.
        plots: PNG files written.
    """

    run_dir: Path | str
    name: str
    metrics: list[str]
    modes: list[str]
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    pareto: list[dict[str, Any]] = field(default_factory=list)
    best_config_path: Path | None = None
    registry_ref: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    wall_s: float | None = None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _error_text(err: BaseException) -> str:
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    ours = [x for x in lines if "TrainingError" in x or ("trial " in x and "failed" in x)]
    return (ours[-1] if ours else " | ".join(lines[-2:]) or type(err).__name__)[:500]


def trial_records(grid: Any, keys: list[str], tcfg: TuneConfig, attempts: dict[str, int]) -> list[dict[str, Any]]:
    """Records of every trial of a Tune ResultGrid, in the grid's order (after `--resume` that is not
    necessarily the order the trials were created in)."""
    out = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(str(r.path)).name
        status = "ERROR" if r.error else "TERMINATED"
        out.append({
            "trial_id": trial_id, "status": status,
            # Stopped by the scheduler: it ended without the loop's final (done) report and without an error.
            "early_stopped": status == "TERMINATED" and not m.get(LOOP_DONE, False),
            "params": {k: (r.config or {}).get(k) for k in keys},
            "metrics": {k: m.get(k) for k in dict.fromkeys([*tcfg.metrics, "val_loss", "train_loss"])},
            "step": m.get("step"), "total_steps": m.get("total_steps"),
            "iterations": m.get("training_iteration"), "wall_s": m.get("time_total_s"),
            "stop_reason": m.get("stop_reason"), "attempts": attempts.get(trial_id, 0),
            "error": _error_text(r.error) if r.error else None,
            "checkpoint_path": m.get("checkpoint_path"),
        })
    return out


def pareto_front(records: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """Trials no other trial beats on every objective (ties on all objectives keep both)."""
    sign = [1 if m == "min" else -1 for m in modes]

    def vec(r: dict[str, Any]) -> list[float]:
        return [s * r["metrics"][k] for s, k in zip(sign, metrics)]

    front = []
    for r in records:
        v = vec(r)
        dominated = any(all(a <= b for a, b in zip(vec(o), v)) and any(a < b for a, b in zip(vec(o), v))
                        for o in records if o is not r)
        if not dominated:
            front.append(r)
    return front


def pick_best(records: list[dict[str, Any]], metrics: list[str], modes: list[str]
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best trial, Pareto front) over trials that reported every objective.

    Single objective: the best last-reported value. Multi-objective: the Pareto member with the best first
    objective.
    """
    ok = [r for r in records if r["status"] == "TERMINATED" and all(_finite(r["metrics"].get(k)) for k in metrics)]
    if not ok:
        return {}, []
    front = pareto_front(ok, metrics, modes) if len(metrics) > 1 else []
    pool = front or ok
    sign = 1 if modes[0] == "min" else -1
    best = min(pool, key=lambda r: (sign * r["metrics"][metrics[0]], r["trial_id"]))
    return best, front or [best]


def write_best_config(base: dict[str, Any], best: dict[str, Any], sweep_name: str, out: Path,
                      metrics: list[str]) -> Path:
    """A plain run config (tune section removed) with the best trial's parameters, for `fineray train`."""
    cfg = trial_config(base, best["params"], "unused", best["trial_id"]).to_dict()
    cfg.pop("tune", None)
    cfg["output"].update({k: base.get("output", {}).get(k) for k in ("dir", "register_adapter")})
    cfg["output"]["name"] = f"{sweep_name}-best"
    cfg["eval"]["enabled"] = base.get("eval", {}).get("enabled", True)
    score = ", ".join(f"{k}={best['metrics'][k]:.6g}" for k in metrics if _finite(best["metrics"].get(k)))
    header = (f"# Best trial {best['trial_id']} of sweep {sweep_name} ({score}).\n"
              f"# Searched: {best['params']}\n# Train it: fineray train {out.name}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return out


def register_best(base: dict[str, Any], tcfg: TuneConfig, best: dict[str, Any], sweep_uri: str,
                  sweep_name: str) -> str:
    """Register the best trial's adapter (from its final Ray Train checkpoint); returns `name@vN`."""
    from fineray.train.launcher import dataset_fingerprint
    from fineray.train.registry import AdapterRegistry

    cfg = trial_config(base, best["params"], sweep_uri, best["trial_id"])
    ckpt = best.get("checkpoint_path")
    if not ckpt:
        raise RuntimeError(f"best trial {best['trial_id']} reported no checkpoint")
    name = tcfg.registry_name or default_registry_name(cfg, sweep_name)
    hp = {"method": cfg.method, "lora": cfg.lora.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
          "num_workers": cfg.scaling.num_workers, "searched": best["params"]}
    if cfg.objective != "sft":  # preference objectives: what was trained, besides what was searched
        hp["objective"], hp["dpo"] = cfg.objective, cfg.dpo.model_dump(mode="json")
    metrics = {k: v for k, v in best["metrics"].items() if _finite(v)}
    metrics["steps"] = best.get("step")
    lineage = {"sweep_id": sweep_name, "sweep_dir": sweep_uri, "trial_id": best["trial_id"],
               "objective": dict(zip(tcfg.metrics, tcfg.modes)), "checkpoint": ckpt,
               "parent": cfg.model.adapter, "training_objective": cfg.objective}
    reg = AdapterRegistry(cfg.output.registry)
    with tempfile.TemporaryDirectory(prefix="fineray-best-") as tmp:
        if storage.is_remote(sweep_uri):
            fs, _ = storage.open_fs(sweep_uri)
            ckpt_dir = storage.download_dir(fs, ckpt, Path(tmp) / "ckpt")
        else:
            ckpt_dir = Path(ckpt)
        version = reg.register(name, weights_dir(ckpt_dir), base_model=cfg.model.base, method=cfg.method,
                               hyperparameters=hp, dataset_fingerprint=dataset_fingerprint(cfg),
                               metrics=metrics, lineage=lineage,
                               kind="reward" if cfg.objective == "reward" else "adapter")
    return version.ref


def default_registry_name(cfg: RunConfig, sweep_name: str) -> str:
    """The sweep name without its timestamp; `<base>-<method>-sweep` for default-named sweeps."""
    stem = run_stem(sweep_name)
    if stem in ("", "sweep"):
        stem = f"{model_stem(cfg.model.base)}-{cfg.method}-sweep"
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("-._")[:64] or "sweep"


def _study(records: list[dict[str, Any]], space: dict[str, Distribution], metrics: list[str],
           modes: list[str]) -> Any:
    import optuna

    study = optuna.create_study(directions=["minimize" if m == "min" else "maximize" for m in modes])
    dists = {k: d.to_optuna() for k, d in space.items()}
    for r in records:
        vals = [r["metrics"].get(k) for k in metrics]
        ok = r["status"] == "TERMINATED" and all(_finite(v) for v in vals)
        params = {k: v for k, v in r["params"].items() if k in dists and v is not None}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params},
            values=[float(v) for v in vals] if ok else None,
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL))
    return study


def _importances(study: Any, target: Any) -> dict[str, float]:
    """Optuna's PED-ANOVA importances (no scikit-learn needed); |Spearman rho| when too few trials."""
    import numpy as np
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    try:
        imp = dict(get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target=target))
    except Exception as e:  # noqa: BLE001 - PED-ANOVA needs enough trials above its quantile
        log.debug("PED-ANOVA importances unavailable (%s); using rank correlation", e)
        imp = {}
    if imp and sum(imp.values()) > 0:
        return imp
    done = [t for t in study.trials if t.values is not None]
    y = np.array([target(t) for t in done], dtype=float)
    out = {}
    for name in {k for t in done for k in t.params}:
        xs = [t.params.get(name) for t in done]
        cats = sorted({str(x) for x in xs})
        x = np.array([float(v) if isinstance(v, (int, float)) else cats.index(str(v)) for v in xs])
        rho = 0.0
        if len(set(x)) > 1 and len(set(y)) > 1:
            rx, ry = x.argsort().argsort(), y.argsort().argsort()
            rho = abs(float(np.corrcoef(rx, ry)[0, 1]))
        out[name] = rho
    total = sum(out.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in out.items()), key=lambda kv: -kv[1]))


def write_plots(records: list[dict[str, Any]], space: dict[str, Distribution], metrics: list[str],
                modes: list[str], out_dir: Path) -> list[Path]:
    """optimization_history.png, param_importances.png (and pareto_front.png for 2 objectives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(records, space, metrics, modes)
    if not any(t.values is not None for t in study.trials):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)

    def target(t: Any) -> float:
        return t.values[0]

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        ax = ovm.plot_optimization_history(study, target=target if len(metrics) > 1 else None,
                                           target_name=metrics[0])
        ax.figure.set_size_inches(7, 4)
        ax.figure.tight_layout()
        ax.figure.savefig(out_dir / "optimization_history.png", dpi=100)
        plt.close(ax.figure)
        written.append(out_dir / "optimization_history.png")
        imp = _importances(study, target)
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(imp) + 1.5))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance for {metrics[0]} (normalised)")
        ax.set_title("hyperparameter importance")
        fig.tight_layout()
        fig.savefig(out_dir / "param_importances.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "param_importances.png")
        if len(metrics) == 2:
            ax = ovm.plot_pareto_front(study, target_names=metrics)
            ax.figure.tight_layout()
            ax.figure.savefig(out_dir / "pareto_front.png", dpi=100)
            plt.close(ax.figure)
            written.append(out_dir / "pareto_front.png")
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.4g}"
    return "-" if v is None else str(v)


def _status(r: dict[str, Any]) -> str:
    if r["status"] != "TERMINATED":
        return r["status"]
    return "diverged" if r.get("stop_reason") == "diverged" else "ok"


def print_sweep(result: SweepResult, console: Any) -> None:
    """Print the trials table (params, objectives, steps, status, early stop), the best trial and errors."""
    from rich.table import Table

    keys = list(result.trials[0]["params"]) if result.trials else []
    short = [k.split(".")[-1] for k in keys]
    heads = short if len(set(short)) == len(short) else keys  # `lr`, `r`, ... unless two keys share a leaf
    t = Table(title=f"sweep {result.name}: {len(result.trials)} trials (* = best)")
    for col in ("trial", *heads, *result.metrics, "step", "iters", "status", "early stop"):
        t.add_column(col, justify="left" if col in ("trial", "status") else "right", no_wrap=col == "trial")
    best_ids = {r["trial_id"] for r in result.pareto} | ({result.best["trial_id"]} if result.best else set())
    for r in result.trials:
        mark = "*" if r["trial_id"] in best_ids else ""
        t.add_row(r["trial_id"] + mark, *[_fmt(r["params"].get(k)) for k in keys],
                  *[_fmt(r["metrics"].get(m)) for m in result.metrics], _fmt(r["step"]), _fmt(r["iterations"]),
                  _status(r), "yes" if r["early_stopped"] else "no")
    console.print(t)
    if result.best:
        score = ", ".join(f"{m}={_fmt(result.best['metrics'].get(m))}" for m in result.metrics)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in result.best["params"].items())
        console.print(f"best trial {result.best['trial_id']}: {score}  ({params})", highlight=False)
    if len(result.metrics) > 1:
        console.print("Pareto front: " + ", ".join(r["trial_id"] for r in result.pareto))
    if result.best_config_path:
        console.print(f"best config: {result.best_config_path}")
    if result.registry_ref:
        console.print(f"registered adapter: {result.registry_ref}")
    for e in result.errors:
        console.print(f"[red]trial {e['trial_id']} failed:[/] {e['error']}", highlight=False)
    if result.plots:
        console.print("plots: " + ", ".join(str(p) for p in result.plots))
