"""Live sweep output in the driver: one line per finished trial above a rich progress bar, `trials.jsonl`,
and the periodic snapshot of Tune's state (see state.py). Tune callbacks reach it through `plugins.LIVE`."""

from __future__ import annotations

import logging
import time
from typing import Any, Self

from fineray.base import storage
from fineray.tune.config import TuneConfig
from fineray.tune.state import snapshot
from fineray.tune.trainable import append_line

__all__ = ["Reporter"]

log = logging.getLogger(__name__)


class Reporter:
    """Live output: a line per finished trial above a rich progress bar, and trials.jsonl."""

    def __init__(self, sweep_uri: str, tcfg: TuneConfig, seen: set[str], progress: bool):
        self.sweep_uri, self.tcfg, self.progress = sweep_uri, tcfg, progress
        self.seen = set(seen)  # trials already in trials.jsonl (a resumed sweep re-reports some of them)
        self.done = len(self.seen)
        self._bar: Any = None
        self._next_snapshot = 0.0

    def __enter__(self) -> Self:
        if self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._bar.start()
            self._task = self._bar.add_task("sweep", total=self.tcfg.num_samples, completed=self.done)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def finished(self, rec: dict[str, Any]) -> None:
        if rec["trial_id"] in self.seen:  # finished before an interruption; Tune's state had not caught up
            return
        self.seen.add(rec["trial_id"])
        self.done += 1
        m = rec["metrics"]
        early = rec["status"] != "ERROR" and not m.get("train_done", False)
        rec["early_stopped"] = early
        fs, path = storage.open_fs(self.sweep_uri)
        row = {"trial_id": rec["trial_id"], "status": rec["status"], "early_stopped": early,
               "params": rec["params"], "step": m.get("step"),
               "metrics": {k: m.get(k) for k in self.tcfg.metrics}, "error": rec["error"], "time": time.time()}
        append_line(fs, f"{path}/trials.jsonl", row)
        if self._bar is None:
            return
        score = " ".join(f"{k}={m[k]:.4f}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}"
                         for k in self.tcfg.metrics)
        params = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                          for k, v in rec["params"].items() if k in self.tcfg.search_space)
        if rec["status"] == "ERROR":
            what = "[red]ERROR[/] " + str(rec["error"])
        elif m.get("stop_reason") == "diverged":
            what = f"[yellow]diverged[/] (loss NaN/Inf) at step {m.get('step')}"
        else:
            what = f"{score} step {m.get('step')}" + (" [yellow](early-stopped)[/]" if early else "")
        self._bar.console.print(f"trial {self.done}/{self.tcfg.num_samples} {rec['trial_id']}: {what}  {params}",
                                highlight=False)
        self._bar.update(self._task, completed=self.done)

    def tick(self) -> None:
        """Called at every Tune controller step: snapshot Tune's state when it loads cleanly (see state.py)."""
        now = time.monotonic()
        if now < self._next_snapshot:
            return
        self._next_snapshot = now + (10.0 if storage.is_remote(self.sweep_uri) else 3.0)
        try:
            snapshot(self.sweep_uri)
        except Exception as e:  # noqa: BLE001 - a missed snapshot only matters if the driver dies right now
            log.debug("tune state snapshot failed: %s", e)

    def retrying(self, trial_id: str, failures: int) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[yellow]trial {trial_id} failed (failure {failures}); retrying from its "
                                    "last checkpoint[/]", highlight=False)
