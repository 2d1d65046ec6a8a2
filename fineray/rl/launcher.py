"""`fineray rl`: GRPO on Ray Train, with rollout and reward-model actors beside the training workers.

The run directory and the registry entry are those of `fineray train` (launcher.run_train: config, adapter,
metrics, loss curve, held-out evaluation, resume by run name) plus `reward.png`, the reward curve (training
batches and greedy validation prompts). The registry lineage names the algorithm and reward functions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fineray.rl.config import RlConfig, parse_rl_config
from fineray.train.config import ConfigError, RunConfig

__all__ = ["rollout_backend", "run_rl"]


def rollout_backend(cfg: RunConfig, rl: RlConfig) -> str:
    """`engine` or `policy` for `rl.rollout.backend` (auto: the engine when the adapter is plain LoRA)."""
    if rl.rollout.backend != "auto":
        return rl.rollout.backend
    if cfg.method not in ("lora", "qlora"):
        return "policy"
    if cfg.model.adapter:  # a DoRA (or otherwise unservable) parent adapter stays unservable after training
        from fineray.serve.lora_stack import AdapterError, read_lora
        from fineray.train.launcher import resolve_adapter

        try:
            read_lora(resolve_adapter(cfg) or "", "parent")
        except AdapterError:
            return "policy"
    return "engine"


def _check_rewards(cfg: RunConfig, rl: RlConfig) -> None:
    """Fail before any worker starts: user functions that do not import, reward models not registered."""
    import os

    from fineray.rl.rewards import load_callable
    from fineray.train.registry import AdapterRegistry, RegistryError

    for spec in rl.rewards:
        if spec.function:
            try:
                load_callable(spec.function, os.getcwd())
            except Exception as e:  # noqa: BLE001 - any import-time failure of user code
                raise ConfigError(f"rl.rewards: cannot load {spec.function}: {type(e).__name__}: {e}") from None
        if spec.model:
            try:
                kind = AdapterRegistry(cfg.output.registry).get(spec.model).manifest.get("kind", "adapter")
            except RegistryError as e:
                raise ConfigError(f"rl.rewards: {e}") from None
            if kind != "reward":
                raise ConfigError(f"rl.rewards: {spec.model} is a {kind}, not a reward model "
                                  "(train one with objective: reward)")


def _services(rl: RlConfig, backend: str) -> Any:
    @contextlib.contextmanager
    def start(cfg: RunConfig) -> Iterator[dict[str, Any]]:
        import ray

        from fineray.rl._rollout import RolloutWorker
        from fineray.rl.rewards import RewardModelWorker

        ro, use_gpu, world = rl.rollout, cfg.scaling.use_gpu, cfg.scaling.num_workers
        threads = ro.threads or (None if use_gpu else _cpus())
        actors = []
        if backend == "engine":
            cls = ray.remote(RolloutWorker).options(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus, max_concurrency=world + 1)
            actors = [cls.remote(cfg.model.base, device="cuda" if ro.num_gpus else "cpu", dtype=cfg.model.dtype,
                                 max_batch_size=ro.max_batch_size, threads=threads) for _ in range(ro.workers)]
        models = {}
        for ref in sorted({s.model for s in rl.rewards if s.model}):
            cls = ray.remote(RewardModelWorker).options(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus,
                                                        max_concurrency=world + 1)
            models[ref] = cls.remote(ref, cfg.output.registry, device="cuda" if ro.num_gpus else "cpu", threads=threads)
        try:
            yield {"rl_services": {"rollout_actors": actors, "reward_models": models}}
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.get(a.close.remote(), timeout=30)
            for a in actors + list(models.values()):
                ray.kill(a)

    return start


def _cpus() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_rl(cfg: RunConfig, *, progress: bool = True, evaluate: bool | None = None) -> dict[str, Any]:
    """GRPO per `cfg` on Ray Train: write the run directory, register the adapter, return the summary.

    Re-running with the same `output.dir` + `output.name` resumes from the run's latest checkpoint.

    Raises:
        ConfigError: a bad `rl:` section, a reward function that does not load, an unknown reward model.
        TrainingError: the run failed (the message names the root cause).
    """
    from fineray.rl._loop import rl_worker_entry
    from fineray.train.launcher import plot_curves, run_train

    rl = parse_rl_config(cfg)
    backend = rollout_backend(cfg, rl)
    if backend == "engine" and cfg.scaling.use_gpu and not rl.rollout.num_gpus:
        raise ConfigError("rl.rollout.num_gpus must be > 0 on GPU (e.g. 0.5, with scaling.resources_per_worker "
                          "{GPU: 0.5}, to share one GPU), or set rl.rollout.backend=policy")
    _check_rewards(cfg, rl)
    lineage = {"algorithm": "grpo", "rollout": backend,
               "reward_functions": [r.model_dump(mode="json", exclude_none=True) for r in rl.rewards]}
    summary = run_train(cfg, progress=progress, evaluate=evaluate, entry=rl_worker_entry,
                        services=_services(rl, backend), lineage=lineage)
    run_dir = Path(summary["run_dir"]) if not str(summary["run_dir"]).startswith(("s3://", "gs://")) else None
    metrics = Path(summary["weights_dir"]).parent / "metrics.jsonl"
    history = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    rows = [r for r in history if "reward_mean" in r]
    if rows:
        if run_dir is not None:
            plot_curves(history, run_dir / "reward.png", "reward_mean", "val_reward_mean",
                        ("reward (training rollouts, sampled)", "reward (validation prompts, greedy)"), "summed reward")
        vals = [r["val_reward_mean"] for r in history if "val_reward_mean" in r]
        summary.update({"rollout": backend, "reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"],
                        "val_reward_first": vals[0] if vals else None, "val_reward_last": vals[-1] if vals else None,
                        "rollout_s": sum(r["rollout_s"] for r in rows) / len(rows),
                        "reward_s": sum(r["reward_s"] for r in rows) / len(rows),
                        "train_s": sum(r["train_s"] for r in rows) / len(rows)})
        if run_dir is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
