"""AutoML sweeps: Ray Tune + Optuna over fine-tuning runs (`fineray tune`).

`run_sweep(cfg)` / `resume_sweep(run_dir)` return a `SweepResult`; `print_sweep(result, console)` prints it.
Exports are imported lazily so that config validation does not import Ray.
"""

from __future__ import annotations

from fineray.base.lazy import lazy_exports

__all__ = ["SweepError", "SweepResult", "TuneConfig", "parse_tune_config", "print_sweep", "resume_sweep", "run_sweep",
           "validate_search_space"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "run_sweep": "fineray.tune.sweep",
    "resume_sweep": "fineray.tune.sweep",
    "SweepError": "fineray.tune.sweep",
    "SweepResult": "fineray.tune.report",
    "print_sweep": "fineray.tune.report",
    "TuneConfig": "fineray.tune.config",
    "parse_tune_config": "fineray.tune.config",
    "validate_search_space": "fineray.tune.config",
})
