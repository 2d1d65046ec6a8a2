"""The typed `tune:` section of a run config and its search space.

A sweep config is a normal run config plus

    tune:
      metric: val_loss            # or a list for multi-objective: [val_loss, trainable_params]
      mode: min                   # or a list matching `metric`
      num_samples: 16
      scheduler: {type: asha, grace_period: 2, reduction_factor: 3}
      search_space:
        train.lr: {loguniform: [1.0e-5, 1.0e-3]}
        lora.r: {choice: [4, 8, 16]}

Search-space keys are dotted RunConfig keys. Every key and distribution is checked here, before Ray starts:
the bounds (or every choice) are applied to the base config with `apply_overrides` and validated, so a typo
(`train.lrr`) or an out-of-range value (`lora.dropout: {uniform: [0, 1.5]}`) is an error naming the key.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fineray.train.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    format_validation_error,
    validate_config,
)

__all__ = [
    "TRAINING_METRICS",
    "Distribution",
    "SchedulerConfig",
    "TuneConfig",
    "base_point",
    "parse_distribution",
    "parse_tune_config",
    "validate_search_space",
]

# Metrics the training loop itself reports at every eval (usable by ASHA / median stopping). Anything else
# (e.g. field_accuracy, rouge_l) comes from the held-out evaluation each trial runs after training.
TRAINING_METRICS = frozenset({"val_loss", "val_ppl", "train_loss", "trainable_params", "tokens_per_s",
                              "time_total_s", "step",
                              # preference objectives (dpo, ipo, orpo, simpo, reward) at every eval
                              "val_reward_accuracy", "val_reward_margin", "val_chosen_reward",
                              "val_rejected_reward", "val_logp_chosen", "val_logp_rejected", "val_kl",
                              "val_preference_accuracy"})
# Distribution name -> number of arguments.
_ARITY = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Section):
    """Early stopping of bad trials.

    Attributes:
        type: `asha` (async successive halving), `median` (median stopping rule) or `none`.
        time_attr: the time axis: `step` (optimizer steps; exact across resumes) or `training_iteration`
            (number of reports, one per eval interval).
        grace_period: a trial runs at least this long (in `time_attr` units) before it can be stopped;
            default: one eval interval (`train.eval_every` steps, or 1 report).
        reduction_factor: ASHA keeps the top 1/reduction_factor of trials at each rung.
        max_t: ASHA's maximum time per trial; default: `train.max_steps` (or the eval count). A max_t below
            the run length stops every trial at max_t.
        metric: the metric the scheduler watches; default: the (first) objective when the loop reports it
            at every eval, else `val_loss`. Early stopping only works on training metrics.
        mode: `min`/`max` for `metric`; default: the objective's mode (`min` for a `val_loss` fallback).
    """

    type: Literal["asha", "median", "none"] = "asha"
    time_attr: Literal["step", "training_iteration"] = "step"
    grace_period: int | None = Field(None, ge=1)
    reduction_factor: float = Field(3, gt=1)
    max_t: int | None = Field(None, ge=1)
    metric: str | None = None
    mode: Literal["min", "max"] | None = None


class TuneConfig(_Section):
    """The `tune:` section.

    Attributes:
        metric: the objective (a training metric such as `val_loss`, or an eval metric such as
            `field_accuracy`), or a list of objectives for a multi-objective (Pareto) search.
        mode: `min`/`max`, or a list matching `metric`.
        num_samples: number of trials.
        max_concurrent_trials: default: cluster CPUs (GPUs with `scaling.use_gpu`) // one trial's need.
        scheduler: early stopping (ASHA by default).
        search_space: dotted RunConfig key -> one-key distribution mapping
            (`uniform`/`loguniform`: [low, high], `quniform`: [low, high, q], `randint`: [low, high]
            inclusive, `choice`: [values...]).
        seed: seed of Optuna's TPE sampler.
        base_first: evaluate the base config's own values as the first trial.
        max_failures: retries of a failing trial (each retry resumes the trial's last checkpoint).
        register_adapter: register the best trial's adapter in `output.registry`.
        registry_name: adapter name for the best trial (default: the sweep name without timestamp).
        plots: write optimisation-history / parameter-importance PNGs.
    """

    metric: str | list[str] = "val_loss"
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    search_space: dict[str, Any]
    seed: int = 0
    base_first: bool = True
    max_failures: int = Field(1, ge=0)
    register_adapter: bool = True
    registry_name: str | None = None
    plots: bool = True

    @field_validator("search_space", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        """Accept nested keys too (`train: {lr: {...}}`, what `tune.search_space.train.lr=...` overrides
        produce) as dotted ones; a later entry for the same key wins."""
        if not isinstance(v, dict):
            return v
        out: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for k, val in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                # a section: {leaf: {dist: args}, ...} with no distribution names among its keys
                section = (isinstance(val, dict) and val and not set(val) & set(_ARITY)
                           and all(isinstance(x, dict) for x in val.values()))
                if section:
                    walk(key, val)
                else:
                    out.pop(key, None)
                    out[key] = val

        walk("", v)
        return out

    @model_validator(mode="after")
    def _metric_mode(self) -> TuneConfig:
        metrics, modes = self.metrics, self.modes
        if len(metrics) != len(modes):
            raise ValueError(f"metric has {len(metrics)} entries but mode has {len(modes)}")
        if not metrics or len(set(metrics)) != len(metrics):
            raise ValueError(f"metric must be one or more distinct names, got {self.metric!r}")
        if not self.search_space:
            raise ValueError("search_space is empty: give at least one `key: {distribution: [...]}`")
        if self.registry_name:
            from fineray.train.registry import RegistryError, validate_name

            try:
                validate_name(self.registry_name)
            except RegistryError as e:
                raise ValueError(str(e)) from None
        if self.scheduler.metric and self.scheduler.metric not in TRAINING_METRICS:
            raise ValueError(f"scheduler.metric={self.scheduler.metric!r} is not reported during training; "
                             f"use one of {sorted(TRAINING_METRICS)}")
        return self

    @property
    def metrics(self) -> list[str]:
        """The objectives as a list."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        """One mode per objective (a single mode applies to a single metric)."""
        if isinstance(self.mode, str):
            return [self.mode] * (1 if isinstance(self.metric, str) else len(self.metric))
        return list(self.mode)

    @property
    def needs_eval(self) -> bool:
        """Whether a trial must run the held-out evaluation to produce an objective."""
        return any(m not in TRAINING_METRICS for m in self.metrics)

    def scheduler_target(self) -> tuple[str, str]:
        """(metric, mode) the early-stopping scheduler watches."""
        s = self.scheduler
        if s.metric:
            mode = s.mode or (self.modes[self.metrics.index(s.metric)] if s.metric in self.metrics else "min")
            return s.metric, mode
        if self.metrics[0] in TRAINING_METRICS:
            return self.metrics[0], s.mode or self.modes[0]
        return "val_loss", s.mode or "min"


class Distribution(BaseModel):
    """One parsed search-space entry."""

    key: str
    kind: str
    args: list[Any]

    def bounds_to_check(self) -> list[Any]:
        """Values that must be valid for the key: both ends of a range, or every choice."""
        return list(self.args) if self.kind == "choice" else list(self.args[:2])

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(_same(value, c) for c in self.args)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.args[0] <= value <= self.args[1]

    def clip(self, value: Any) -> Any:
        """The nearest value inside the distribution (for the base-config point)."""
        if self.contains(value):
            return value if self.kind != "choice" else next(c for c in self.args if _same(value, c))
        if self.kind == "choice":
            nums = [c for c in self.args if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if nums and isinstance(value, (int, float)) and not isinstance(value, bool):
                return min(nums, key=lambda c: abs(c - value))
            return self.args[0]
        lo, hi = self.args[0], self.args[1]
        out = min(max(value, lo), hi) if isinstance(value, (int, float)) else lo
        return round(out) if self.kind == "randint" else float(out)

    def to_optuna(self) -> Any:
        import optuna.distributions as od

        a = self.args
        if self.kind == "uniform":
            return od.FloatDistribution(float(a[0]), float(a[1]))
        if self.kind == "loguniform":
            return od.FloatDistribution(float(a[0]), float(a[1]), log=True)
        if self.kind == "quniform":
            return od.FloatDistribution(float(a[0]), float(a[1]), step=float(a[2]))
        if self.kind == "randint":
            return od.IntDistribution(int(a[0]), int(a[1]))
        return od.CategoricalDistribution(list(a))


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (
        isinstance(a, (int, float)) and isinstance(b, (int, float))
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _to_num(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def parse_distribution(key: str, spec: Any) -> Distribution:
    """Check one `key: {kind: args}` entry (type, arity, bounds) and parse it."""
    where = f"tune.search_space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution like {{loguniform: [1e-5, 1e-3]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in _ARITY:
        raise ConfigError(f"{where}: unknown distribution {kind!r} (use one of {sorted(_ARITY)})")
    if not isinstance(args, (list, tuple)):
        raise ConfigError(f"{where}: {kind} needs a list of arguments, got {args!r}")
    args = list(args)
    arity = _ARITY[kind]
    if arity is None:
        if not args:
            raise ConfigError(f"{where}: choice needs at least one value")
        if len({json.dumps(a, sort_keys=True) for a in args}) != len(args):
            raise ConfigError(f"{where}: choice has duplicate values {args!r}")
        for a in args:
            if not (a is None or isinstance(a, (bool, int, float, str))):
                raise ConfigError(f"{where}: choice values must be numbers, strings, booleans or null; "
                                  f"got {a!r}")
        return Distribution(key=key, kind=kind, args=args)
    if len(args) != arity:
        raise ConfigError(f"{where}: {kind} takes {arity} numbers "
                          f"({'[low, high, q]' if arity == 3 else '[low, high]'}), got {len(args)}: {args!r}")
    # PyYAML reads `1e-5` (no dot) as a string; accept numeric strings in numeric distributions.
    args = [_to_num(a) for a in args]
    if not all(_num(a) for a in args):
        raise ConfigError(f"{where}: {kind} arguments must be finite numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if lo >= hi:
        raise ConfigError(f"{where}: low must be < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform bounds must be > 0, got [{lo}, {hi}]")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
    if kind == "randint":
        args = [int(a) for a in args]
    if kind == "quniform" and not 0 < args[2] <= hi - lo:
        raise ConfigError(f"{where}: quniform step q must be in (0, high-low], got {args[2]}")
    return Distribution(key=key, kind=kind, args=args)


def parse_tune_config(cfg: RunConfig) -> TuneConfig:
    """The validated `tune:` section of a run config (ConfigError naming the key when invalid)."""
    if not cfg.tune:
        raise ConfigError("this config has no `tune:` section (metric, mode, num_samples, search_space)")
    try:
        return TuneConfig.model_validate(cfg.tune)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "tune", "tune section", section="tune")) from None


def validate_search_space(cfg: RunConfig, tcfg: TuneConfig | None = None) -> dict[str, Distribution]:
    """Parse every search-space entry and check its values against the RunConfig schema.

    Raises:
        ConfigError: naming `tune.search_space.<key>` for an unknown key, a bad distribution, or a value the
            run config rejects.
    """
    tcfg = tcfg or parse_tune_config(cfg)
    base = cfg.to_dict()
    base.pop("tune", None)
    space: dict[str, Distribution] = {}
    for key, spec in tcfg.search_space.items():
        where = f"tune.search_space.{key}"
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{where}: keys are dotted RunConfig keys like train.lr or lora.r")
        if parts[0] in ("tune", "output", "cluster"):
            raise ConfigError(f"{where}: the {parts[0]} section cannot be searched")
        current = _lookup(base, parts)
        if isinstance(current, dict):
            raise ConfigError(f"{where}: is a whole section; keys are dotted RunConfig keys like train.lr or lora.r")
        if not isinstance(current, (int, float, str, bool, type(None))):
            raise ConfigError(f"{where}: not a RunConfig setting (unknown key)")
        dist = parse_distribution(key, spec)
        for value in dist.bounds_to_check():
            try:
                validate_config(apply_overrides(base, [f"{key}={json.dumps(value)}"]), "search space")
            except ConfigError as e:
                detail = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: value {value!r} is not valid for the run config ({detail})") from None
        space[key] = dist
    return space


_MISSING = object()


def _lookup(data: dict[str, Any], parts: list[str]) -> Any:
    node: Any = data
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return _MISSING
        node = node[p]
    return node


def base_point(cfg: RunConfig, space: dict[str, Distribution]) -> dict[str, Any]:
    """The base config's values of the searched keys (clipped into their distributions), for trial 1."""
    base = cfg.to_dict()
    return {k: d.clip(_lookup(base, k.split("."))) for k, d in space.items()}
