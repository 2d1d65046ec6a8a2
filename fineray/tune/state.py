"""Keep Ray Tune's experiment state restorable when the sweep driver is killed.

Tune writes its state (tuner.pkl, experiment_state-*.json, search_gen_state-*.json, searcher-state-*.pkl) to a
staging folder and copies it to the sweep's `tune/` folder every few seconds. The copy is not atomic: a driver
killed during it leaves a truncated file (seen here: an empty search_gen_state), and `Tuner.restore` then
silently starts a fresh experiment. So while the sweep runs, the driver keeps a snapshot of the last state
that loaded cleanly (`tune-snapshot/`), and `resume_sweep` puts it back when the live files are damaged.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from fineray.base import storage

__all__ = ["StateDamaged", "damaged", "repair", "snapshot", "state_files"]

log = logging.getLogger(__name__)
_STATE = re.compile(r"^(tuner\.pkl|experiment_state-.+\.json|search_gen_state-.+\.json|searcher-state-.+\.pkl)$")
SNAPSHOT = "tune-snapshot"


class StateDamaged(RuntimeError):
    """Tune's saved state is unreadable and no clean snapshot exists."""


def state_files(fs: Any, tune_dir: str) -> list[str]:
    """Names of Tune's driver-state files in `tune_dir`."""
    return [n for n in storage.listdir(fs, tune_dir) if _STATE.match(n)]


def _loads(name: str, data: bytes) -> None:
    if not data:
        raise ValueError("empty")
    if name.startswith("experiment_state-"):  # JSON; the others are (cloud)pickles, search_gen_state-*.json too
        json.loads(data)
    else:
        import ray.cloudpickle as pickle

        pickle.loads(data)


def damaged(fs: Any, tune_dir: str) -> list[str]:
    """State files that do not load (truncated or empty)."""
    bad = []
    for name in state_files(fs, tune_dir):
        try:
            _loads(name, storage.read_bytes(fs, f"{tune_dir}/{name}"))
        except Exception:  # noqa: BLE001 - any decode error means the file is unusable
            bad.append(name)
    return bad


def snapshot(sweep_uri: str) -> bool:
    """Copy Tune's state to `tune-snapshot/` if every file loads; returns whether a snapshot was taken."""
    fs, path = storage.open_fs(sweep_uri)
    tune_dir = f"{path}/tune"
    blobs = {}
    for name in state_files(fs, tune_dir):
        try:
            data = storage.read_bytes(fs, f"{tune_dir}/{name}")
            _loads(name, data)
        except Exception:  # noqa: BLE001 - any decode error means the file is unusable
            return False
        blobs[name] = data
    if "tuner.pkl" not in blobs or not any(n.startswith("experiment_state-") for n in blobs):
        return False
    for name, data in blobs.items():
        storage.atomic_write_bytes(fs, f"{path}/{SNAPSHOT}/{name}", data)
    storage.atomic_write_bytes(fs, f"{path}/{SNAPSHOT}/taken.json", json.dumps({"time": time.time()}).encode())
    return True


def repair(sweep_uri: str) -> list[str]:
    """Replace damaged Tune state files with the snapshot; returns the names replaced or removed.

    Raises:
        StateDamaged: when files are damaged and there is no snapshot to restore them from.
    """
    fs, path = storage.open_fs(sweep_uri)
    tune_dir = f"{path}/tune"
    bad = damaged(fs, tune_dir)
    if not bad:
        return []
    snap = f"{path}/{SNAPSHOT}"
    saved = state_files(fs, snap)
    if not saved:
        raise StateDamaged(f"Ray Tune's saved state in {tune_dir} is damaged ({', '.join(bad)}) and there is no "
                           "snapshot to restore it from; start the sweep again under a new output.name")
    for name in state_files(fs, tune_dir):
        if name not in saved:  # a newer session's file would shadow the snapshot's: drop it
            fs.delete_file(f"{tune_dir}/{name}")
    for name in saved:
        storage.atomic_write_bytes(fs, f"{tune_dir}/{name}", storage.read_bytes(fs, f"{snap}/{name}"))
    log.warning("Ray Tune's saved state was damaged by the interruption (%s); restored the last clean snapshot",
                ", ".join(bad))
    return bad
