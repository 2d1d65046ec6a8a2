"""What every `fineray` command shares: the consoles, error exits, config loading and result tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fineray.train.config import RunConfig

__all__ = ["check_kind_section", "console", "err", "fail", "fmt", "load_run_config", "print_summary", "user_errors"]

console = Console()
err = Console(stderr=True)


def fail(msg: str, code: int = 2) -> None:
    """Print `error: msg` on stderr and exit with `code` (2: bad usage or config, 1: the command failed)."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def load_run_config(config: Path | None, overrides: list[str]) -> RunConfig:
    """The validated `RunConfig` from `config` plus `key=value` overrides; a config error exits with 2."""
    from fineray.train.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))


def check_kind_section(cfg: RunConfig, kind: str) -> None:
    """Validate the section a run kind reads (`tune:`, `federated:`, `rl:`) before the run is submitted or
    rendered for a cluster, so a bad key fails here instead of after the job waited for the cluster; exits
    with 1 then, as the kind's own command does."""
    from fineray.train.config import ConfigError

    try:
        if kind == "tune":
            from fineray.tune.config import parse_tune_config, validate_search_space

            validate_search_space(cfg, parse_tune_config(cfg))
        elif kind == "federated":
            from fineray.federated.config import federated_config

            federated_config(cfg)
        elif kind == "rl":
            from fineray.rl.config import parse_rl_config

            parse_rl_config(cfg)
    except ConfigError as e:
        fail(str(e), 1)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix (config, data, model, registry, missing file): shown without a
    traceback."""
    from fineray.train.config import ConfigError
    from fineray.train.data import DataError
    from fineray.train.model import ModelError
    from fineray.train.registry import RegistryError

    return (ConfigError, DataError, ModelError, RegistryError, FileNotFoundError)


def fmt(v: Any) -> str:
    """A table cell: floats to 4 decimals, `None` as `-`."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def print_summary(summary: dict[str, Any]) -> None:
    """The final table of a training run: training numbers, then base vs tuned metrics."""
    t = Table(title=f"run {summary.get('name')}", show_header=False)
    for k in ("steps", "wall_s", "tokens_per_s", "train_loss_first", "train_loss_last", "val_loss",
              "trainable_params", "stop_reason", "registry_ref", "run_dir"):
        if k in summary:
            t.add_row(k, fmt(summary[k]))
    console.print(t)
    base, tuned = summary.get("base_metrics"), summary.get("tuned_metrics")
    if base:
        m = Table(title="held-out evaluation")
        m.add_column("metric")
        m.add_column("base")
        m.add_column("tuned")
        for k, v in base.items():
            if isinstance(v, (int, float)) and k not in ("n", "eval_s"):
                m.add_row(k, fmt(v), fmt((tuned or {}).get(k)))
        console.print(m)
    for d in summary.get("diagnostics") or []:
        console.print(f"[yellow]diagnostic ({d['kind']}):[/] {d['message']}")
