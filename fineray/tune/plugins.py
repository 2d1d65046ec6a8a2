"""fineray's Ray Tune plug-ins: the Optuna searcher, the persistent ASHA scheduler and the sweep callback.

They live in the sweep's Ray Tune state (pickled with the Tuner, restored by `--resume`) and hold only plain
data; the live pieces (rich progress bar, trials.jsonl writer) are looked up by sweep id in `LIVE`, so a
restored Tuner's callback talks to the current driver's progress display.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ray.tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from fineray.base import storage

__all__ = ["LIVE", "PersistentASHA", "Searcher", "SweepCallback", "trial_dirname", "trial_record"]

# sweep id -> object with `finished(record)`, `retrying(trial_id, failures)` and `tick()` (sweep._Reporter).
LIVE: dict[str, Any] = {}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_dirname(trial: Any) -> str:
    """Tune trial folders are named by trial id (the trials/<id> Train storage uses the same id)."""
    return trial.trial_id


class Searcher(OptunaSearch):
    """OptunaSearch that tolerates results without the objective, and saves its state atomically.

    Intermediate results of an eval-metric sweep (e.g. `field_accuracy`) carry only training metrics; the
    objective arrives with the trial's last result. Stock OptunaSearch raises KeyError on such results.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, str) and not _finite(result.get(self.metric)):
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        # An early-stopped trial of an eval-objective sweep has no objective: tell Optuna "pruned", not None.
        metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric or [])
        if result and not all(_finite(result.get(m)) for m in metrics):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Atomic version of OptunaSearch.save (which truncates the file in place while Tune may copy it)."""
        with storage.atomic_file(checkpoint_path) as tmp:
            super().save(str(tmp))


class PersistentASHA(ASHAScheduler):
    """ASHA whose rung records survive `--resume`.

    Tune saves trials and the searcher but not the scheduler: a restored ASHA starts with empty rungs and
    compares resumed trials only with each other. This one writes its rungs (trial id -> reward per
    milestone; ray 2.60's `_Bracket._rungs`) to `state_uri` after every result and reads them back once.
    """

    def __init__(self, *, state_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_uri = state_uri
        self._restored = False

    def _restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        fs, path = storage.open_fs(self.state_uri)
        if not storage.exists(fs, path):
            return
        saved = json.loads(storage.read_bytes(fs, path))
        for bracket, rungs in zip(self._brackets, saved.get("brackets", [])):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update({k: v for k, v in saved_recorded.items() if k not in recorded})

    def _save(self) -> None:
        fs, path = storage.open_fs(self.state_uri)
        data = {"brackets": [[[m, rec] for m, rec in b._rungs] for b in self._brackets]}
        storage.atomic_write_bytes(fs, path, json.dumps(data, default=float).encode())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._restore()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._restore()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._restore()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def trial_record(trial: Any, failed: bool = False) -> dict[str, Any]:
    """A compact record of a finished Tune trial (callbacks run before Tune updates `trial.status`)."""
    last = dict(trial.last_result or {})
    rec = {"trial_id": trial.trial_id, "status": "ERROR" if failed else "TERMINATED", "params": dict(trial.config or {}),
           "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool)) or v is None},
           "error": None}
    if failed:
        err = None
        get_error = getattr(trial, "get_error", None)
        if callable(get_error):
            try:
                err = get_error()
            except Exception:  # noqa: BLE001 - best effort: the final table reads errors from the ResultGrid
                err = None
        rec["error"] = str(err).strip().splitlines()[-1] if err else "failed (see the final table)"
    return rec


class SweepCallback(ray.tune.Callback):
    """Forwards trial completions, errors and retries to the live reporter of the sweep."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id = sweep_id

    def _live(self) -> Any:
        return LIVE.get(self.sweep_id)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if (live := self._live()) is not None:
            live.finished(trial_record(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if (live := self._live()) is not None:
            live.finished(trial_record(trial, failed=True))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if (live := self._live()) is not None:
            live.tick()

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if (live := self._live()) is not None:
            live.retrying(trial.trial_id, int(getattr(trial.run_metadata, "num_failures", 0)))
