"""AutoML sweeps: Ray Tune + Optuna over fine-tuning runs (`fineray tune`).

`run_sweep(cfg)` / `resume_sweep(run_dir)` return a `SweepResult`; `print_sweep(result, console)` prints it.
Exports are imported lazily so that config validation does not import Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SweepError",
    "SweepResult",
    "TuneConfig",
    "parse_tune_config",
    "print_sweep",
    "resume_sweep",
    "run_sweep",
    "validate_search_space",
]

_WHERE = {"run_sweep": "sweep", "resume_sweep": "sweep", "SweepError": "sweep", "SweepResult": "report",
          "print_sweep": "report", "TuneConfig": "config", "parse_tune_config": "config",
          "validate_search_space": "config"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"fineray.tune.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fineray.tune' has no attribute {name!r}")
