"""`fineray tune`: Ray Tune + Optuna (TPE) over fine-tuning runs; the winner is registered.

Sweep folder (`output.dir/output.name`, default name `sweep-<timestamp>`; local or `s3://`):
    sweep.json           the run config with its tune section (what `--resume` restarts from)
    tune/                Ray Tune experiment state (Tuner.restore)
    tune-snapshot/       the last clean copy of Tune's state (see state.py)
    asha_state.json      ASHA's rungs (Tune does not save scheduler state; see plugins.PersistentASHA)
    trials/<trial_id>/   each trial's Ray Train run, attempts.jsonl and final.json
    trials.jsonl         one line per finished trial, appended live
    results.json         all trial records, best trial, Pareto front, errors
    best_config.yaml     the best parameters as a plain run config (`fineray train best_config.yaml`)
    optimization_history.png, param_importances.png (pareto_front.png with two objectives)

Early stopping (ASHA / median) watches a metric the training loop reports at every eval (val_loss by
default); the median rule's statistics restart on `--resume`. Objectives from the held-out evaluation (e.g.
field_accuracy) are computed after a trial's training finishes, so with such objectives the scheduler still
stops on val_loss (or use `scheduler: {type: none}`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from fineray.base import storage
from fineray.base.connect import ray_cluster
from fineray.base.runs import default_run_name
from fineray.train.config import ConfigError, RunConfig, validate_config
from fineray.tune.config import (
    TRAINING_METRICS,
    Distribution,
    TuneConfig,
    base_point,
    parse_tune_config,
    validate_search_space,
)
from fineray.tune.progress import Reporter
from fineray.tune.report import (
    SweepResult,
    pick_best,
    register_best,
    trial_records,
    write_best_config,
    write_plots,
)
from fineray.tune.state import StateDamaged, repair

__all__ = ["SweepError", "check_objectives", "resume_sweep", "run_sweep", "trial_resources"]

log = logging.getLogger(__name__)
DRIVER_CPU = 0.01  # the trial's Tune actor only waits on its TorchTrainer (0 is rejected by Tune)
EVAL_ONLY = {"perplexity", "general_perplexity"}


class SweepError(RuntimeError):
    """A sweep that cannot start or resume; the message says why."""


def trial_resources(cfg: RunConfig) -> tuple[dict[str, float], float, float]:
    """(resources per Ray Train worker, CPUs per trial, GPUs per trial) including the trial driver.

    On CPU, a worker without an explicit CPU share gets 0.99 so that driver + worker of a one-worker trial
    take exactly one CPU (1.0 per worker would need 1.01 and halve the number of concurrent trials).
    """
    sc = cfg.scaling
    per_worker = dict(sc.resources_per_worker or {})
    if sc.use_gpu:
        per_worker.setdefault("GPU", 1.0)
        per_worker.setdefault("CPU", 1.0)
    else:
        per_worker.setdefault("CPU", 1.0 - DRIVER_CPU)
    cpu = DRIVER_CPU + sc.num_workers * per_worker["CPU"]
    gpu = sc.num_workers * per_worker.get("GPU", 0.0)
    return per_worker, cpu, gpu


def check_objectives(cfg: RunConfig, tcfg: TuneConfig) -> None:
    """Objectives must be training metrics or metrics the held-out evaluation computes."""
    known = TRAINING_METRICS | EVAL_ONLY | set(cfg.eval.metrics)
    for m in tcfg.metrics:
        if m not in known:
            raise ConfigError(f"tune.metric: {m!r} is neither a training metric ({', '.join(sorted(TRAINING_METRICS))})"
                              f" nor in eval.metrics ({', '.join(cfg.eval.metrics)})")
    if tcfg.needs_eval and not (cfg.eval.data or isinstance(cfg.data.validation, str)):
        raise ConfigError("tune.metric needs the held-out evaluation: set eval.data (or data.validation to a file)")


def _sweep_uri(cfg: RunConfig) -> str:
    if not cfg.output.name:
        cfg.output.name = default_run_name("tune")
    if storage.is_remote(cfg.output.dir):
        return storage.join(cfg.output.dir, cfg.output.name)
    return str(Path(cfg.output.dir).expanduser().resolve() / cfg.output.name)


def _local_dir(sweep_uri: str, name: str) -> Path:
    """Where the sweep's own files are written (uploaded afterwards for remote sweeps)."""
    if storage.is_remote(sweep_uri):
        from fineray.train._cache import cache_dir

        return cache_dir() / "sweeps" / name
    return Path(sweep_uri)


@contextlib.contextmanager
def _ray(cfg: RunConfig) -> Iterator[None]:
    """Ray for the sweep: a private local cluster (with the dashboard, pinned by address), or the configured one.

    Why the dashboard and the pinned address (`fineray.base.connect`): when Tune stops a trial (ASHA), the
    trial's Ray Train controller dies with it and Train V2's PlacementGroupCleaner frees the workers' placement
    group only after seeing the controller dead through the State API. That API finds "the" cluster by
    address; with several Ray clusters on one machine (or no dashboard) the lookup fails, the group leaks, and
    later trials wait forever for CPUs. Worker logs stay in Ray's log files.
    """
    with ray_cluster(cfg.cluster.address, cfg.cluster.num_cpus, log_to_driver=False):
        yield


def _trainable(cfg: RunConfig, tcfg: TuneConfig, space: dict[str, Distribution], sweep_uri: str) -> Any:
    from ray import tune

    from fineray.tune.trainable import run_trial

    per_worker, cpu, _ = trial_resources(cfg)
    base = cfg.to_dict()
    base["scaling"]["resources_per_worker"] = per_worker
    fn = tune.with_parameters(run_trial, base=base, sweep_uri=sweep_uri, keys=list(space),
                              needs_eval=tcfg.needs_eval, eval_threads=max(1, int(cpu)))
    return tune.with_resources(fn, {"cpu": DRIVER_CPU, "gpu": 0})


def _concurrency(cfg: RunConfig, tcfg: TuneConfig) -> int:
    import ray

    res = ray.cluster_resources()
    _, cpu, gpu = trial_resources(cfg)
    fit = int(res.get("CPU", 0) // cpu) if cpu else tcfg.num_samples
    if gpu:
        fit = min(fit, int(res.get("GPU", 0) // gpu + 1e-9))
    if fit < 1:
        raise SweepError(f"one trial needs {cpu:g} CPU" + (f" and {gpu:g} GPU" if gpu else "") +
                         f" but the cluster has {res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} GPU")
    if tcfg.max_concurrent_trials:
        if tcfg.max_concurrent_trials > fit:
            log.warning("tune.max_concurrent_trials=%d but only %d trials fit the cluster at once; the rest "
                        "wait for resources", tcfg.max_concurrent_trials, fit)
        return tcfg.max_concurrent_trials
    return max(1, min(fit, tcfg.num_samples))


def _scheduler(cfg: RunConfig, tcfg: TuneConfig, sweep_uri: str) -> Any:
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule

    from fineray.tune.plugins import PersistentASHA

    s = tcfg.scheduler
    if s.type == "none":
        return FIFOScheduler()
    metric, mode = tcfg.scheduler_target()
    by_step = s.time_attr == "step"
    total = cfg.train.max_steps
    grace = s.grace_period or (cfg.train.eval_every if by_step else 1)
    if s.type == "median":
        # min_time_slice=huge: with too few finished trials to compare against, the stock rule PAUSEs a trial
        # to let pending ones run, and a paused function trainable restarts (here: from its Train checkpoint).
        return MedianStoppingRule(time_attr=s.time_attr, metric=metric, mode=mode, grace_period=grace,
                                  min_samples_required=2, min_time_slice=2**62)
    max_t = s.max_t or (total if by_step and total else max(1, (total or 100) // cfg.train.eval_every) + 1)
    if by_step and total and max_t < total:
        log.warning("ASHA max_t=%d < train.max_steps=%d: every trial stops at step %d", max_t, total, max_t)
    # stop_last_trials=False: a trial reaching max_t finishes its own run (final checkpoint, eval,
    # final.json) instead of being killed at its last report.
    return PersistentASHA(time_attr=s.time_attr, metric=metric, mode=mode, grace_period=grace,
                          reduction_factor=s.reduction_factor, max_t=max_t, stop_last_trials=False,
                          state_uri=storage.join(sweep_uri, "asha_state.json"))


def _new_tuner(cfg: RunConfig, tcfg: TuneConfig, space: dict[str, Distribution], sweep_uri: str) -> Any:
    from ray import tune

    from fineray.tune.plugins import Searcher, SweepCallback, trial_dirname

    multi = len(tcfg.metrics) > 1
    searcher = Searcher(space={k: d.to_optuna() for k, d in space.items()},
                        metric=tcfg.metrics if multi else tcfg.metrics[0],
                        mode=tcfg.modes if multi else tcfg.modes[0],
                        points_to_evaluate=[base_point(cfg, space)] if tcfg.base_first else None, seed=tcfg.seed)
    return tune.Tuner(
        _trainable(cfg, tcfg, space, sweep_uri),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(cfg, tcfg, sweep_uri),
                                    num_samples=tcfg.num_samples, max_concurrent_trials=_concurrency(cfg, tcfg),
                                    trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_uri, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
                                  callbacks=[SweepCallback(cfg.output.name)]),
    )


def _tune_env() -> None:
    # Intermediate results of eval-metric sweeps lack the objective; Tune's strict check would fail them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Save Tune's experiment state every 2 s (default: >= 10 s) so a killed driver loses little on --resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune's console tables and banners duplicate our per-trial lines; verbose=0 silences the legacy output.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _read_lines(fs: Any, path: str) -> list[dict[str, Any]]:
    if not storage.exists(fs, path):
        return []
    return [json.loads(x) for x in storage.read_bytes(fs, path).decode().splitlines() if x.strip()]


def _execute(cfg: RunConfig, tcfg: TuneConfig, space: dict[str, Distribution], sweep_uri: str, *,
             restore: bool, progress: bool) -> SweepResult:
    from fineray.tune.plugins import LIVE

    name = cfg.output.name
    fs, path = storage.open_fs(sweep_uri)
    seen = {row["trial_id"] for row in _read_lines(fs, f"{path}/trials.jsonl")}
    t0 = time.perf_counter()
    _tune_env()
    with _ray(cfg), Reporter(sweep_uri, tcfg, seen, progress) as rep:
        from ray import tune

        LIVE[name] = rep
        try:
            if restore:
                tuner = tune.Tuner.restore(storage.join(sweep_uri, "tune"), trainable=_trainable(cfg, tcfg, space, sweep_uri),
                                           resume_unfinished=True, resume_errored=False, restart_errored=False)
            else:
                tuner = _new_tuner(cfg, tcfg, space, sweep_uri)
            grid = tuner.fit()
        finally:
            LIVE.pop(name, None)
    if len(rep.seen) < tcfg.num_samples:  # Ctrl-C: Tune saved its state and returned early
        raise SweepError(f"sweep interrupted after {len(rep.seen)} of {tcfg.num_samples} trials; continue it "
                         f"with `fineray tune --resume {sweep_uri}`")
    attempts = {}
    for trial_id in storage.listdir(fs, f"{path}/trials"):
        attempts[trial_id] = len(_read_lines(fs, f"{path}/trials/{trial_id}/attempts.jsonl"))
    return _finish(cfg, tcfg, space, sweep_uri, grid, attempts, time.perf_counter() - t0)


def _finish(cfg: RunConfig, tcfg: TuneConfig, space: dict[str, Distribution], sweep_uri: str, grid: Any,
            attempts: dict[str, int], wall: float) -> SweepResult:
    name = cfg.output.name
    local = _local_dir(sweep_uri, name)
    local.mkdir(parents=True, exist_ok=True)
    base = cfg.to_dict()
    records = trial_records(grid, list(space), tcfg, attempts)
    best, front = pick_best(records, tcfg.metrics, tcfg.modes)
    result = SweepResult(run_dir=Path(sweep_uri) if not storage.is_remote(sweep_uri) else sweep_uri, name=name,
                         metrics=tcfg.metrics, modes=tcfg.modes, trials=records, best=best, pareto=front,
                         errors=[{"trial_id": r["trial_id"], "params": r["params"], "error": r["error"]}
                                 for r in records if r["status"] == "ERROR"], wall_s=round(wall, 1))
    fs, path = storage.open_fs(sweep_uri)
    prev = json.loads(storage.read_bytes(fs, f"{path}/results.json")) if storage.exists(fs, f"{path}/results.json") else {}
    if best:
        result.best_config_path = write_best_config(base, best, name, local / "best_config.yaml", tcfg.metrics)
        if (prev.get("best") or {}).get("trial_id") == best["trial_id"] and prev.get("registry_ref"):
            result.registry_ref = prev["registry_ref"]  # resuming a finished sweep: registered already
        elif tcfg.register_adapter and cfg.output.register_adapter:
            result.registry_ref = register_best(base, tcfg, best, sweep_uri, name)
    if tcfg.plots:
        try:
            result.plots = write_plots(records, space, tcfg.metrics, tcfg.modes, local)
        except Exception as e:  # noqa: BLE001 - plots are a convenience; never lose the sweep over them
            log.warning("could not draw the sweep plots: %s", e)
    summary = dict(result.__dict__)
    (local / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    if storage.is_remote(sweep_uri):
        for f in [local / "results.json", result.best_config_path, *result.plots]:
            if f is not None:
                storage.atomic_write_bytes(fs, f"{path}/{f.name}", f.read_bytes())
    return result


def run_sweep(cfg: RunConfig, *, progress: bool = True) -> SweepResult:
    """Run the sweep described by `cfg.tune` and return its result.

    The search space is validated before Ray starts (ConfigError naming the key). The sweep folder is
    `output.dir/output.name` (default name `sweep-<timestamp>`); an interrupted sweep continues with
    `resume_sweep(that folder)`.
    """
    tcfg = parse_tune_config(cfg)
    space = validate_search_space(cfg, tcfg)
    check_objectives(cfg, tcfg)
    from fineray.train.launcher import check_run_data

    # Bad data fails here, not in every trial; the size check only when no trial changes the step's size.
    check_run_data(cfg, check_size=not {"train.batch_size", "scaling.num_workers"} & set(space))
    sweep_uri = _sweep_uri(cfg)
    fs, path = storage.open_fs(sweep_uri)
    if storage.exists(fs, f"{path}/tune"):
        raise SweepError(f"{sweep_uri} already holds a sweep: resume it with `fineray tune --resume {sweep_uri}` "
                         "or pick another output.name")
    storage.atomic_write_bytes(fs, f"{path}/sweep.json", json.dumps(
        {"config": cfg.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2).encode())
    storage.atomic_write_bytes(fs, f"{path}/config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    from fineray.train.model import resolve_base

    resolve_base(cfg.model.base)  # convert/cache the base model once here, not in every trial's workers
    return _execute(cfg, tcfg, space, sweep_uri, restore=False, progress=progress)


def resume_sweep(run_dir: str | Path, *, progress: bool = True) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones resume from their last
    checkpoint, and the remaining samples are drawn from the restored Optuna study."""
    uri = str(run_dir) if storage.is_remote(str(run_dir)) else str(Path(run_dir).expanduser().resolve())
    fs, path = storage.open_fs(uri)
    if not storage.exists(fs, f"{path}/sweep.json"):
        raise SweepError(f"{uri} is not a sweep folder (no sweep.json)")
    from ray import tune

    try:
        repair(uri)
    except StateDamaged as e:
        raise SweepError(str(e)) from None
    if not tune.Tuner.can_restore(storage.join(uri, "tune")):
        raise SweepError(f"{uri}/tune holds no restorable Tune state (the sweep died before its first save); "
                         "start it again with `fineray tune`")
    cfg = validate_config(json.loads(storage.read_bytes(fs, f"{path}/sweep.json"))["config"], f"{uri}/sweep.json")
    tcfg = parse_tune_config(cfg)
    space = validate_search_space(cfg, tcfg)
    return _execute(cfg, tcfg, space, uri, restore=True, progress=progress)
