"""fineray.base.storage: atomic writes keep the old content on failure; folder copies keep the tree."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from fineray.base import storage


def test_atomic_writes_replace_whole_files_and_folders_or_nothing(tmp_path: Path) -> None:
    # Prepare
    fs, root = storage.open_fs(str(tmp_path))
    storage.atomic_write_bytes(fs, f"{root}/a/state.json", b"old")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"v1")
    # Execute: a writer that fails half-way, then one that succeeds
    with pytest.raises(RuntimeError), storage.atomic_file(tmp_path / "a" / "state.json") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), storage.atomic_dir(tmp_path / "model") as d:
        (d / "w.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    with storage.atomic_dir(tmp_path / "model") as d:
        (d / "w.bin").write_bytes(b"v2")
    # Assert: the failed writes left nothing behind, the good one replaced the folder
    assert (tmp_path / "a" / "state.json").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["state.json"]
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "model"]


def test_upload_and_download_copy_the_tree(tmp_path: Path) -> None:
    # Prepare: a local folder and a "remote" filesystem rooted elsewhere
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_text("x")
    (src / "y.bin").write_bytes(b"\0\1")
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    (tmp_path / "bucket").mkdir()
    # Execute
    storage.upload_dir(src, remote, "runs/r1")
    back = storage.download_dir(remote, "runs/r1", tmp_path / "back")
    # Assert
    assert storage.listdir(remote, "runs/r1") == ["sub", "y.bin"]
    assert (back / "sub" / "x.txt").read_text() == "x" and (back / "y.bin").read_bytes() == b"\0\1"
