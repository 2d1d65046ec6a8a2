"""Live progress from rank 0 to the driver: a tiny Ray actor holding the latest row, polled by a thread.

Works the same on a laptop and on a remote cluster (the driver only talks to the actor), and costs one
fire-and-forget actor call per logged step.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Self

__all__ = ["ProgressBoard", "watch_progress"]


def _actor_cls() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def push(self, row: dict[str, Any]) -> None:
            self.rows.append(row)

        def since(self, n: int) -> list[dict[str, Any]]:
            return self.rows[n:]

    return ProgressBoard


def ProgressBoard() -> Any:  # reads like the class it creates
    """Create the progress actor (call inside an initialised Ray)."""
    return _actor_cls().remote()


class watch_progress:  # used as a context manager
    """Render a rich progress bar (step, loss, tokens/s, ETA) from the board while the body runs."""

    def __init__(self, board: Any, total_steps: int | None, enabled: bool = True, label: str = "train"):
        self.board, self.total, self.enabled, self.label = board, total_steps, enabled, label
        self._stop = threading.Event()
        self.rows: list[dict[str, Any]] = []

    def _run(self) -> None:
        import ray
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as bar:
            task = bar.add_task(self.label, total=self.total, info="starting workers...")
            while not self._stop.is_set():
                try:
                    new = ray.get(self.board.since.remote(len(self.rows)), timeout=10)
                except Exception:  # noqa: BLE001 - the actor may be gone at shutdown
                    new = []
                for row in new:
                    self.rows.append(row)
                    if row.get("total_steps"):
                        bar.update(task, total=row["total_steps"])
                    info = f"loss {row.get('train_loss', float('nan')):.4f}"
                    if "val_loss" in row:
                        info += f" val {row['val_loss']:.4f}"
                    if "tokens_per_s" in row:
                        info += f" {row['tokens_per_s']:,.0f} tok/s"
                    bar.update(task, completed=row.get("step", 0), info=info)
                time.sleep(0.5)

    def __enter__(self) -> Self:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=15)
