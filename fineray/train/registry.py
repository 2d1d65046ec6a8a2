"""The adapter registry: every finished adapter as an immutable, hashed version.

Layout (a local folder or a storage URI such as `s3://bucket/adapters`):
    <root>/<name>/v<N>/adapter_config.json
    <root>/<name>/v<N>/adapter_model.safetensors
    <root>/<name>/v<N>/manifest.json     kind (`adapter`, or `reward` for a reward model), base model, method,
                                         hyperparameters, dataset fingerprint, metrics, created time, lineage
                                         (run dir, parent adapter, objective, reward functions), sha256 of
                                         every file
A version is published atomically: files are staged in a hidden folder and renamed into place (local), or
uploaded with the manifest last (object stores: a version without manifest is invisible). Train, tune,
federated and serve all read and write adapters through this class.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from fineray.base import storage
from fineray.train._cache import cache_dir

__all__ = ["AdapterRegistry", "AdapterVersion", "RegistryError", "parse_ref", "sha256_file", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"


class RegistryError(LookupError):
    """Unknown adapter, bad name, or a registry that cannot be written."""


def validate_name(name: str) -> str:
    """Adapter names are 1-64 chars of letters, digits, '.', '_' and '-' (no path traversal)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RegistryError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name`, `name@3` or `name@v3` -> (name, version or None for latest)."""
    name, _, ver = ref.partition("@")
    validate_name(name)
    if not ver:
        return name, None
    m = re.fullmatch(r"v?(\d+)", ver)
    if not m:
        raise RegistryError(f"invalid adapter version in {ref!r}: use name@3 or name@v3")
    return name, int(m.group(1))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    """One registered adapter version."""

    name: str
    version: int
    uri: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


class AdapterRegistry:
    """A folder (local or remote) of named, versioned adapters.

    Subclasses keep other artefacts with the same versioning and atomic publish (`DatasetRegistry` in
    `fineray.train.datasets`); `kind` names them in errors.
    """

    kind = "adapter"

    def __init__(self, root: str):
        self.root = root
        self.fs, self.path = storage.open_fs(root)

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return [n for n in storage.listdir(self.fs, self.path) if _NAME.match(n)]

    def versions(self, name: str) -> list[AdapterVersion]:
        """Published versions of `name`, oldest first."""
        validate_name(name)
        out = []
        for entry in storage.listdir(self.fs, f"{self.path}/{name}"):
            m = re.fullmatch(r"v(\d+)", entry)
            mpath = f"{self.path}/{name}/{entry}/{MANIFEST}"
            if m and storage.exists(self.fs, mpath):
                manifest = json.loads(storage.read_bytes(self.fs, mpath))
                out.append(AdapterVersion(name, int(m.group(1)), storage.join(self.root, name, entry), manifest))
        return sorted(out, key=lambda v: v.version)

    def list(self) -> list[AdapterVersion]:
        """Every published version of every adapter."""
        return [v for n in self.names() for v in self.versions(n)]

    def get(self, ref: str) -> AdapterVersion:
        """Resolve `name` (latest) or `name@vN`."""
        name, ver = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no {self.kind} named {name!r} in registry {self.root}")
        if ver is None:
            return versions[-1]
        for v in versions:
            if v.version == ver:
                return v
        raise RegistryError(f"{self.kind} {name!r} has no version {ver} (has {[v.version for v in versions]})")

    def local_path(self, ref: str) -> Path:
        """A local folder holding the adapter files (downloaded to the cache for remote registries)."""
        v = self.get(ref)
        if isinstance(self.fs, pafs.LocalFileSystem):
            return Path(self.fs.normalize_path(f"{self.path}/{v.name}/v{v.version}"))
        digest = hashlib.sha256(f"{self.root}/{v.ref}".encode()).hexdigest()[:16]
        local = cache_dir() / "registry" / digest
        if not (local / MANIFEST).exists():
            tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
            storage.download_dir(self.fs, f"{self.path}/{v.name}/v{v.version}", tmp)
            tmp.rename(local) if not local.exists() else None
        return local

    def verify(self, ref: str) -> list[str]:
        """Files whose sha256 differs from the manifest (empty list = intact)."""
        v = self.get(ref)
        local = self.local_path(ref)
        bad = []
        for rel, digest in v.manifest["files"].items():
            p = local / rel
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(rel)
        return bad

    # ------------------------------------------------------------------ writing
    def register(self, name: str, src_dir: str | Path, *, base_model: str, method: str,
                 hyperparameters: dict[str, Any] | None = None, dataset_fingerprint: str | None = None,
                 metrics: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None,
                 kind: str = "adapter") -> AdapterVersion:
        """Publish the files of `src_dir` as the next version of `name` (`kind`: `adapter`, or `reward` for a
        reward model's score head + adapter)."""
        return self.publish(name, src_dir, {
            "kind": kind, "base_model": base_model, "method": method, "hyperparameters": hyperparameters or {},
            "dataset_fingerprint": dataset_fingerprint, "metrics": metrics or {},
            "lineage": lineage or {},
        })

    def publish(self, name: str, src_dir: str | Path, fields: dict[str, Any]) -> AdapterVersion:
        """Publish the files of `src_dir` as the next version of `name`, with `fields` in its manifest (plus
        name, created time and the sha256 of every file). Atomic: staged, then renamed into place."""
        validate_name(name)
        src = Path(src_dir)
        files = {p.relative_to(src).as_posix(): sha256_file(p) for p in sorted(src.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        if not files:
            raise RegistryError(f"nothing to register: {src} has no files")
        manifest = {"name": name, **_jsonable(fields),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
        stage = f"{self.path}/{name}/.stage-{uuid.uuid4().hex}"
        storage.upload_dir(src, self.fs, stage)
        storage.atomic_write_bytes(self.fs, f"{stage}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        for _ in range(100):  # another writer may take the same version number: take the next one
            # Count unpublished leftovers too (a crashed writer's v<N> without manifest): never reuse a number.
            taken = [int(e[1:]) for e in storage.listdir(self.fs, f"{self.path}/{name}") if re.fullmatch(r"v\d+", e)]
            version = max(taken, default=0) + 1
            try:
                storage.rename(self.fs, stage, f"{self.path}/{name}/v{version}")
                break
            except OSError:
                continue
        else:
            raise RegistryError(f"could not allocate a version for {name!r} in {self.root}")
        return AdapterVersion(name, version, storage.join(self.root, name, f"v{version}"), manifest)

    def remove(self, ref: str) -> list[AdapterVersion]:
        """Remove one version (`name@vN`) or every version (`name`)."""
        name, ver = parse_ref(ref)
        targets = [self.get(ref)] if ver is not None else self.versions(name)
        if not targets:
            raise RegistryError(f"no {self.kind} named {name!r} in registry {self.root}")
        for v in targets:
            storage.remove_tree(self.fs, f"{self.path}/{v.name}/v{v.version}")
        return targets


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))
