"""Run names and run kinds: how every run (training, sweep, federation, GRPO, submitted job) is named.

A run without `output.name` gets `<what>-<yyyymmdd-hhmmss>`; its adapter registers under the name without the
timestamp (the stem), so repeated runs become versions of one adapter.
"""

from __future__ import annotations

import re
from datetime import datetime

__all__ = ["KINDS", "check_kind", "default_run_name", "model_stem", "registry_name", "run_stem", "timestamp"]

#: The fineray commands that run a config (`fineray <kind> config.yaml`), locally, as a Ray job or a RayJob.
KINDS = ("train", "tune", "federated", "rl")
_STAMP = "%Y%m%d-%H%M%S"
_STAMPED = re.compile(r"(^|-)\d{8}-\d{6}$")
#: Registry names are at most this long.
MAX_NAME = 64


def check_kind(kind: str) -> str:
    """`kind` if it is one of `KINDS`, else ValueError naming the kinds."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind


def timestamp(now: datetime | None = None) -> str:
    """`yyyymmdd-hhmmss` (local time), the suffix of default run names."""
    return (now or datetime.now()).strftime(_STAMP)


def model_stem(model: str) -> str:
    """The last part of a model reference: `embedded:smollm2-135m-instruct` -> `smollm2-135m-instruct`."""
    return model.split(":")[-1].rstrip("/").split("/")[-1]


def default_run_name(kind: str, *, model: str = "", method: str = "", strategy: str = "",
                     now: datetime | None = None) -> str:
    """The name of a run without `output.name`.

    `train` / `rl`: `<model stem>-<method>-<ts>`; `tune`: `sweep-<ts>`; `federated`: `federated-<strategy>-<ts>`.
    """
    check_kind(kind)
    if kind == "tune":
        what = "sweep"
    elif kind == "federated":
        what = f"federated-{strategy.replace('_', '-')}" if strategy else "federated"
    else:
        what = f"{model_stem(model)}-{method}"
    return f"{what}-{timestamp(now)}"


def run_stem(name: str) -> str:
    """`name` without a trailing `-yyyymmdd-hhmmss` (a whole-timestamp name gives '')."""
    return _STAMPED.sub("", name)


def registry_name(name: str | None, default: str) -> str:
    """The registry name of a run: its stem (at most 64 characters), or `default` when that is empty."""
    return (run_stem(name or "") or default)[:MAX_NAME]
