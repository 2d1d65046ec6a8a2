"""Fine-tuning on Ray Train (`fineray train`): the run config, the data, the per-worker loop and the launcher.

`load_config(path, overrides)` gives a validated `RunConfig`; `run_train(cfg)` trains, writes the run folder,
registers the adapter and returns the summary (`TrainingError` when the run fails). Exports are imported
lazily so that loading a config does not import torch or Ray.
"""

from __future__ import annotations

from fineray.base.lazy import lazy_exports

__all__ = ["ConfigError", "RunConfig", "TrainingError", "load_config", "run_train"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "ConfigError": ".config",
    "RunConfig": ".config",
    "load_config": ".config",
    "TrainingError": ".launcher",
    "run_train": ".launcher",
})
