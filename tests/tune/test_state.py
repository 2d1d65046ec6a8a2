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


def test_asha_rungs_survive_a_restore(tmp_path: Path) -> None:
    """Tune does not save scheduler state; PersistentASHA brings its rungs back after `--resume`."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from fineray.tune.plugins import PersistentASHA

    def make() -> PersistentASHA:
        return PersistentASHA(time_attr="step", metric="val_loss", mode="min", grace_period=2, reduction_factor=2,
                              max_t=8, stop_last_trials=False, state_uri=str(tmp_path / "asha_state.json"))

    pickled = pickle.dumps(make())  # what tuner.pkl holds: the scheduler as created
    t1, t2, t3 = (SimpleNamespace(trial_id=f"t{i}") for i in (1, 2, 3))
    # Prepare: before the interruption t1 (1.0) and t2 (2.0) reach the first rung; t2 is stopped
    first = pickle.loads(pickled)
    for t in (t1, t2):
        first.on_trial_add(None, t)
    assert first.on_trial_result(None, t1, {"step": 2, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert first.on_trial_result(None, t2, {"step": 2, "val_loss": 2.0}) == TrialScheduler.STOP
    # Execute: the restored scheduler sees a new trial worse than the rung's median
    restored = pickle.loads(pickled)
    restored.on_trial_add(None, t3)
    action = restored.on_trial_result(None, t3, {"step": 2, "val_loss": 1.8})
    # Assert: stopped (a fresh ASHA with empty rungs would have let it continue)
    assert action == TrialScheduler.STOP
    fresh = pickle.loads(pickled)
    (tmp_path / "asha_state.json").unlink()
    fresh.on_trial_add(None, t3)
    assert fresh.on_trial_result(None, t3, {"step": 2, "val_loss": 1.8}) == TrialScheduler.CONTINUE
