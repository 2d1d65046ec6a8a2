"""Storage URIs: local paths on a laptop, `s3://` / `gs://` / shared paths on a cluster, one code path.

Built on pyarrow filesystems. Writes are atomic: local writes go to a temporary name and are renamed; object
stores have atomic single-object PUTs, and multi-file folders are published by writing their manifest last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

__all__ = [
    "StorageError",
    "atomic_dir",
    "atomic_file",
    "atomic_write_bytes",
    "download_dir",
    "exists",
    "is_remote",
    "join",
    "listdir",
    "open_fs",
    "read_bytes",
    "remove_tree",
    "rename",
    "upload_dir",
]


class StorageError(OSError):
    """A storage URI that cannot be reached or used; the message names it."""


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than file://."""
    return "://" in uri and not uri.startswith("file://")


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_remote(uri):
        local = uri.removeprefix("file://")
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for bad schemes/credentials
        raise StorageError(f"cannot open storage {uri!r}: {e}") from None


def join(base: str, *parts: str) -> str:
    """Join path segments with '/' (URIs and local paths alike)."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listdir(fs: pafs.FileSystem, path: str) -> list[str]:
    """Base names of the entries of a folder (empty when missing)."""
    if not exists(fs, path):
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file so readers see the old or the new content, never a partial one."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open_output_stream(path) as f:  # a single PUT: atomic on object stores
            f.write(data)


def upload_dir(local_dir: str | Path, fs: pafs.FileSystem, dest: str) -> None:
    """Copy a local folder's files (recursively) to `dest` (`pyarrow.fs.copy_files`, threaded)."""
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(fs: pafs.FileSystem, src: str, local_dir: str | Path) -> Path:
    """Copy a folder from storage to a local folder (`pyarrow.fs.copy_files`, threaded); returns it."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src, str(local_dir.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)


def rename(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Move a folder; on a local filesystem this is an atomic rename that fails if `dest` exists."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.rename(src, dest)  # raises if dest is a non-empty dir: no silent overwrite
    else:
        fs.move(src, dest)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write (e.g. by a library that takes a file name); on success it
    replaces `target` in one rename, so readers see the old or the new file; on error it is removed."""
    target = Path(target)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `target` in one rename.

    Readers see the old folder or the complete new one, never a half-written one; on error the temporary
    folder is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
