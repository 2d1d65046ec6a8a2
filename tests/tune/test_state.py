"""Tune state repair: a file truncated by a killed driver is replaced from the last clean snapshot (no Ray)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from fineray.tune.state import StateDamaged, damaged, repair, snapshot


def make_state(d: Path, session: str, payload: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"experiment_state-{session}.json").write_text(json.dumps(payload))
    # Tune pickles this one despite its .json name
    (d / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": payload["n"]}))
    (d / "tuner.pkl").write_bytes(b"\x80\x05N.")  # pickle of None


def test_snapshot_then_repair_restores_truncated_files(tmp_path: Path) -> None:
    # Prepare: a clean state is snapshotted; then a kill truncates one file and a newer session adds one
    tune = tmp_path / "tune"
    make_state(tune, "s1", {"n": 3})
    assert snapshot(str(tmp_path))
    (tune / "search_gen_state-s1.json").write_text("")
    (tune / "experiment_state-s2.json").write_text('{"n": ')
    # Execute
    bad = repair(str(tmp_path))
    # Assert
    assert sorted(bad) == ["experiment_state-s2.json", "search_gen_state-s1.json"]
    assert pickle.loads((tune / "search_gen_state-s1.json").read_bytes()) == {"counter": 3}
    assert not (tune / "experiment_state-s2.json").exists()
    assert damaged(pafs.LocalFileSystem(), str(tune)) == []
    assert repair(str(tmp_path)) == []  # idempotent


def test_snapshot_skips_damaged_state_and_repair_without_snapshot_fails(tmp_path: Path) -> None:
    # Prepare
    tune = tmp_path / "tune"
    make_state(tune, "s1", {"n": 1})
    (tune / "search_gen_state-s1.json").write_bytes(pickle.dumps({"counter": 1})[:-3])
    # Execute / Assert: no snapshot of a damaged state, and repair names the damaged file
    assert not snapshot(str(tmp_path))
    with pytest.raises(StateDamaged, match="search_gen_state-s1.json"):
        repair(str(tmp_path))


def test_half_started_ray_processes_are_ended_by_their_gcs_port() -> None:
    """A failed ray.init leaves its GCS/dashboard running; the retry ends exactly those children."""
    import subprocess
    import sys

    from fineray.tune.sweep import _kill_half_started

    # Prepare: two children, one naming the failed cluster's GCS port
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--gcs-address=10.0.0.1:54321"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--gcs-address=10.0.0.1:5432"])
    try:
        # Execute
        _kill_half_started(54321)
        # Assert
        assert ours.wait(timeout=10) != 0
        assert other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()
