"""Shared fixtures: the tiny model, small data files, and a private fineray cache per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Quieter and faster Ray Train in tests (pitfalls: report barriers wait for the controller's poll).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub here (CI has PyPI only): fail hub lookups at once instead of after ~20 s of connection retries.
# The hub code paths still run and must still give their clear errors (tests/train/test_model.py, test_data.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def start_shared_ray() -> None:
    """Start the shared test Ray (pinned by address: other Ray instances on the machine do not confuse it).
    `silo:acme` is the custom resource the federated simulation places a silo with (no one else asks for it)."""
    from fineray.base.connect import init_ray

    init_ray(None, 2, dashboard=True, resources={"silo:acme": 1})


@pytest.fixture(scope="session")
def shared_ray():
    """One private local Ray (2 CPUs, with the dashboard) for the in-process Ray tests of serve, train and tune.

    Starting Ray costs ~10 s on this 2-core machine; fineray's components reuse an initialised Ray and shut
    down only what they started, so modules can share it. A test that stops it (`no_ray`) only makes later
    users start their own again, as they would without this fixture. The dashboard is on as in a sweep's own
    cluster (`fineray.tune.sweep._ray`): without it Train V2's PlacementGroupCleaner cannot see a stopped
    trial's controller die, the trial's placement group leaks, and a later sweep waits for CPUs forever
    (CI hung 600 s in the DPO sweep that way). Tests must not stop it: every later user would then start
    (and stop) a cluster of its own, ~10 s each.
    """
    import ray

    from fineray.base.connect import shutdown_ray

    start_shared_ray()
    yield
    if ray.is_initialized():
        shutdown_ray()


@pytest.fixture(autouse=True)
def _no_dead_ray_address():
    """After each test: if Ray is down but a private cluster's address is still pinned in RAY_ADDRESS (a test
    stopped it with a plain `ray.shutdown()`), unpin it, so the next `ray.init()` does not wait for a dead GCS
    (that hung a test for its whole timeout once)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and not ray.is_initialized():
        from fineray.base import connect

        connect._unpin()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The cached tiny:llama model directory (built once, well under a second)."""
    from fineray.train._tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir: Path):
    from fineray.train.config import ModelConfig
    from fineray.train.model import load_tokenizer

    return load_tokenizer(ModelConfig(base="tiny:llama"), str(tiny_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(40)]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)
