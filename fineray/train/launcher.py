"""Launch a fine-tuning run on Ray Train and turn its result into a run directory and a registry entry.

Run directory (`output.dir/output.name`):
    config.yaml        the resolved config (every default filled in)
    adapter/           the final PEFT adapter (or model/ for full fine-tuning)
    metrics.jsonl      one row per step (train loss, lr, grad norm, tokens/s, val loss at evals)
    loss.png           train and validation loss curves
    summary.json       steps, wall_s, tokens_per_s, first/last train loss, val loss, base vs tuned metrics,
                       diagnostics, registry reference
    ray/               Ray Train storage (checkpoints); re-running with the same output.name resumes from it
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import yaml

from fineray.base import storage
from fineray.base.connect import ray_cluster
from fineray.base.runs import default_run_name, registry_name
from fineray.train.config import RunConfig
from fineray.train.diagnostics import diagnose
from fineray.train.registry import AdapterRegistry

__all__ = [
    "TrainingError",
    "check_run_data",
    "dataset_fingerprint",
    "make_trainer",
    "plot_curves",
    "resolve_adapter",
    "root_cause",
    "run_dir_for",
    "run_train",
    "write_run_outputs",
]


class TrainingError(RuntimeError):
    """A run that failed or diverged; the message says why and where the logs are."""


def run_dir_for(cfg: RunConfig) -> Path:
    """The local run directory. Names default to `<base>-<method>-<timestamp>`.

    With a remote `output.dir` (s3://, gs://) this is a local staging folder in the cache, uploaded to
    `output.dir/output.name` at the end; Ray Train checkpoints go to the remote storage directly.
    """
    if not cfg.output.name:
        cfg.output.name = default_run_name("train", model=cfg.model.base, method=cfg.method)
    if storage.is_remote(cfg.output.dir):
        from fineray.train._cache import cache_dir

        return cache_dir() / "runs" / hashlib.sha256(cfg.output.dir.encode()).hexdigest()[:12] / cfg.output.name
    return Path(cfg.output.dir).expanduser().resolve() / cfg.output.name


def resolve_adapter(cfg: RunConfig) -> str | None:
    """`model.adapter` as a local path: a folder, or a registry reference (`name` / `name@vN`)."""
    ref = cfg.model.adapter
    if not ref:
        return None
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser().resolve())
    return str(AdapterRegistry(cfg.output.registry).local_path(ref))


def dataset_fingerprint(cfg: RunConfig) -> str:
    """sha256 over the training sources' bytes (or names for hub datasets) and the data settings."""
    from fineray.train.data import BUILTIN_DATASETS, _builtin

    h = hashlib.sha256(json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True).encode())
    for spec in cfg.data.sources():
        p = _builtin(BUILTIN_DATASETS[spec.path]) if spec.path in BUILTIN_DATASETS else Path(spec.path)
        h.update(p.read_bytes() if p.is_file() else spec.path.encode())
    return h.hexdigest()


def make_trainer(cfg: RunConfig, run_dir: Path, *, adapter_path: str | None = None, board: Any = None,
                 storage_path: str | None = None, callbacks: list[Any] | None = None,
                 entry: Callable[[dict[str, Any]], None] | None = None,
                 extra_config: dict[str, Any] | None = None) -> Any:
    """A Ray Train `TorchTrainer` for this config (workers, resources, storage, retries, checkpoints).

    `entry` replaces the training loop's worker function (GRPO's loop; the federated silo's, which runs the same loop with its hooks) and `extra_config` adds entries to
    its `train_loop_config` (actor handles). Preference runs that need precomputed reference log-probs get
    them here, from one Ray Data pass, so sweeps and single runs share it.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from fineray.train.loop import ray_worker_entry
    from fineray.train.reference import needs_precomputed_reference, precompute_reference

    adapter_path = adapter_path or resolve_adapter(cfg)  # sweeps pass none: their trials continue it too
    loop_config = {"run": cfg.to_dict(), "adapter_path": adapter_path, "progress_board": board,
                   **(extra_config or {})}
    if needs_precomputed_reference(cfg):
        loop_config["reference_logps"] = ray.put(precompute_reference(cfg, adapter_path))

    # Ray Train V2 patches `print` in its workers to log through its logger *and* (because Ray wraps the
    # worker's stdout) print again: every step line reached the console twice. The trainer passes this
    # variable on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    sc = cfg.scaling
    resources = dict(sc.resources_per_worker or {})
    if not sc.use_gpu:
        resources.setdefault("CPU", 1)
    return TorchTrainer(
        entry or ray_worker_entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources or None),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=storage_path or str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
    )


def plot_curves(history: list[dict[str, Any]], out: Path, train_key: str, val_key: str, labels: tuple[str, str],
                ylabel: str) -> None:
    """A PNG of `train_key` (a line) and `val_key` (points at evals) over the steps of a metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r[train_key]) for r in history if train_key in r]
    if train:
        ax.plot(*zip(*train), label=labels[0])
    val = [(r["step"], r[val_key]) for r in history if val_key in r]
    if val:
        ax.plot(*zip(*val), "o-", label=labels[1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_run_outputs(cfg: RunConfig, run_dir: Path, ckpt_dir: Path, wall_s: float,
                      final_metrics: dict[str, Any]) -> dict[str, Any]:
    """Copy the final weights and history into the run directory and compute the training summary."""
    weights = "adapter" if (ckpt_dir / "adapter").is_dir() else "model"
    dest = run_dir / weights
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ckpt_dir / weights, dest)
    history = [json.loads(x) for x in (ckpt_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.copy(ckpt_dir / "metrics.jsonl", run_dir / "metrics.jsonl")
    train_rows = [r for r in history if "train_loss" in r]
    if train_rows:
        plot_curves(history, run_dir / "loss.png", "train_loss", "val_loss", ("train loss", "validation loss"),
                    "loss (nats/token)")
    vals = [r["val_loss"] for r in history if "val_loss" in r]
    tps = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    summary = {
        "name": cfg.output.name, "steps": final_metrics.get("step", len(history)), "wall_s": round(wall_s, 2),
        "tokens_per_s": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None),
        "train_loss_first": train_rows[0]["train_loss"] if train_rows else None,
        "train_loss_last": train_rows[-1]["train_loss"] if train_rows else None,
        "val_loss": vals[-1] if vals else None, "best_val_loss": min(vals) if vals else None,
        "stop_reason": final_metrics.get("stop_reason"),
        "trainable_params": final_metrics.get("trainable_params"),
        "total_params": final_metrics.get("total_params"),
        "data": {k[5:]: v for k, v in final_metrics.items() if k.startswith("data_")},
        "diagnostics": diagnose(history), "weights_dir": str(dest),
    }
    evals = [r for r in history if "val_loss" in r]
    if evals and cfg.objective != "sft":  # the preference metrics of the first and last evaluation
        summary["val_first"] = {k: v for k, v in evals[0].items() if k.startswith("val_")}
        summary["val_last"] = {k: v for k, v in evals[-1].items() if k.startswith("val_")}
    return summary


def run_train(cfg: RunConfig, *, progress: bool = True, evaluate: bool | None = None,
              callbacks: list[Any] | None = None, entry: Callable[[dict[str, Any]], None] | None = None,
              services: Callable[[RunConfig], AbstractContextManager[dict[str, Any]]] | None = None,
              lineage: dict[str, Any] | None = None, check_data: bool = True) -> dict[str, Any]:
    """Fine-tune per `cfg` on Ray Train; write the run directory; register the adapter; return the summary.

    Re-running with the same `output.dir` + `output.name` resumes from the run's latest checkpoint.
    `entry`, `services` and `lineage` are for loops built on this one (GRPO): the worker function, a context
    started inside the Ray cluster that yields extra worker config (e.g. rollout actors) and stops them after
    training, and extra lineage for the registry.

    Args:
        check_data: run the cheap data checks first (exact duplicates, leakage, length overflow) and print
            one warning line with their counts on stderr.
    """
    from fineray.train.datasets import pin_dataset_refs

    datasets = pin_dataset_refs(cfg)  # `dataset:` refs -> one registry and version for every worker
    check_run_data(cfg)  # before anything is written or started: the file and line of bad data named
    from fineray.train.preflight import format_plan, plan_run

    plan = plan_run(cfg)  # known-bad combinations and the memory estimate, before any GPU is allocated
    if not plan.ok:
        raise TrainingError(format_plan(plan))
    adapter_path = resolve_adapter(cfg)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data_check = _check_data(cfg) if check_data else None
    from fineray.train.model import resolve_base

    resolve_base(cfg.model.base)  # convert/cache the embedded model once here, not in every worker
    remote = storage.is_remote(cfg.output.dir)
    ray_storage = storage.join(cfg.output.dir, cfg.output.name) if remote else None
    t0 = time.perf_counter()
    with ray_cluster(cfg.cluster.address, cfg.cluster.num_cpus):
        from fineray.train._progress import ProgressBoard, watch_progress

        board = ProgressBoard() if progress else None  # an actor is a Python process (~3 s of CPU to start)
        with contextlib.ExitStack() as stack:
            extra = stack.enter_context(services(cfg)) if services else None
            trainer = make_trainer(cfg, run_dir, adapter_path=adapter_path, board=board, callbacks=callbacks,
                                   storage_path=ray_storage, entry=entry, extra_config=extra)
            stack.enter_context(watch_progress(board, cfg.train.max_steps, enabled=progress))
            try:
                result = trainer.fit()
            except Exception as e:  # Ray wraps worker errors; surface the root cause
                raise TrainingError(f"training failed: {root_cause(e)} (Ray storage: {run_dir / 'ray'})") from e
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise TrainingError(f"training produced no checkpoint (see {run_dir / 'ray'})")
    final = dict(result.metrics or {})
    if final.get("stop_reason") == "diverged":
        raise TrainingError(f"training diverged: the loss became NaN/Inf at step {final.get('step', 0) + 1}; "
                            "lower train.lr or enable train.grad_clip")
    with result.checkpoint.as_directory() as ckpt_dir:
        summary = write_run_outputs(cfg, run_dir, Path(ckpt_dir), wall, final)
    summary["run_dir"] = str(run_dir)
    do_eval = cfg.eval.enabled if evaluate is None else evaluate
    if do_eval and cfg.objective == "reward":  # a score head generates nothing: its metrics are the evals'
        do_eval = False
    if do_eval:
        from fineray.train.evaluate import evaluate_run

        ev = evaluate_run(cfg, summary["weights_dir"], threads=cfg.cluster.num_cpus)
        summary["base_metrics"], summary["tuned_metrics"] = ev["base"], ev.get("tuned")
    else:
        summary["base_metrics"] = summary["tuned_metrics"] = None
    if cfg.output.register_adapter:
        reg = AdapterRegistry(cfg.output.registry)
        hp = {"method": cfg.method, "lora": cfg.lora.model_dump(mode="json"),
              "train": cfg.train.model_dump(mode="json"), "num_workers": cfg.scaling.num_workers}
        metrics = {k: summary[k] for k in ("val_loss", "train_loss_last", "steps", "tokens_per_s")}
        if summary["tuned_metrics"]:
            metrics.update({k: v for k, v in summary["tuned_metrics"].items() if isinstance(v, (int, float))})
        if cfg.objective != "sft":
            hp["objective"], hp["dpo"] = cfg.objective, cfg.dpo.model_dump(mode="json")
            metrics.update(summary.get("val_last") or {})
        version = reg.register(registry_name(cfg.output.name, "adapter"), summary["weights_dir"], base_model=cfg.model.base,
                               method=cfg.method, hyperparameters=hp, dataset_fingerprint=dataset_fingerprint(cfg),
                               metrics=metrics, kind="reward" if cfg.objective == "reward" else "adapter",
                               lineage={"run_dir": str(run_dir), "datasets": datasets, "parent": _parent_ref(cfg),
                                        "objective": cfg.objective, **(lineage or {})})
        summary["registry_ref"] = version.ref
        summary["registry_uri"] = version.uri
    summary["data_check"] = data_check
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if remote:
        fs, path = storage.open_fs(ray_storage)
        storage.upload_dir(run_dir, fs, path)
        summary["run_dir"] = ray_storage
    return summary


def check_run_data(cfg: RunConfig, *, check_size: bool = True) -> None:
    """Raise, before Ray starts, the data errors a run would otherwise meet inside its workers.

    Unreadable or malformed records (the file and line named), records that are not preference pairs for a
    preference objective, and (with `check_size`) fewer training examples than one optimizer step takes.

    Raises:
        DataError: what is wrong and where.
    """
    from fineray.train.data import DataError, load_train_val

    train_ex, _ = load_train_val(cfg.data, cfg.train.seed)
    if cfg.objective != "sft":
        from fineray.train.pairs import check_pairs

        check_pairs(train_ex, cfg.objective)
    need = cfg.train.batch_size * cfg.scaling.num_workers
    if check_size and len(train_ex) < need:
        held = f" after holding out data.validation={cfg.data.validation}" if isinstance(
            cfg.data.validation, float) else ""
        raise DataError(f"{len(train_ex)} training examples{held} are fewer than one step needs "
                        f"(train.batch_size={cfg.train.batch_size} x scaling.num_workers={cfg.scaling.num_workers}"
                        f" = {need}): add data, or lower train.batch_size or scaling.num_workers")


def _check_data(cfg: RunConfig) -> dict[str, Any]:
    """The cheap audit (`fineray.train.audit.quick_check`); its warning line goes to stderr."""
    import sys

    from fineray.train.audit import quick_check
    from fineray.train.model import load_tokenizer, resolve_base

    report, warning = quick_check(cfg, load_tokenizer(cfg.model, resolve_base(cfg.model.base)))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    train = report["splits"]["train"]
    return {"exact_duplicates": report["totals"]["exact_duplicates"], "leakage": report["totals"]["leakage"],
            "over_max_seq_len": train.get("over_max_seq_len"), "records": train["records"]}


def _parent_ref(cfg: RunConfig) -> str | None:
    """The adapter this run continued from: `name@vN` for a registry reference, else its folder."""
    ref = cfg.model.adapter
    if not ref or Path(ref).expanduser().is_dir():
        return ref
    return AdapterRegistry(cfg.output.registry).get(ref).ref


def root_cause(e: BaseException) -> str:
    """`Type: last lines` of the innermost cause of `e` (Ray wraps a worker's error in its own exceptions)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [x for x in str(e).strip().splitlines() if x.strip()][-3:]
    return f"{type(e).__name__}: {' | '.join(lines)}"
