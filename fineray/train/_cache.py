"""The fineray cache folder and a cross-process "build once" helper for cached artefacts."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from fineray.base.storage import atomic_dir

__all__ = ["build_once", "cache_dir"]


def cache_dir() -> Path:
    """`$FINERAY_CACHE`, else `$XDG_CACHE_HOME/fineray`, else `~/.cache/fineray`."""
    env = os.environ.get("FINERAY_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fineray"
    base.mkdir(parents=True, exist_ok=True)
    return base


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first if missing.

    `build(tmp)` writes into a temporary sibling folder which is renamed into place, under a file lock, so
    concurrent processes (two Ray workers on one node) build it once and never see a half-written folder.
    """
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        with atomic_dir(target) as tmp:
            build(tmp)
            (tmp / ".complete").touch()
    return target
