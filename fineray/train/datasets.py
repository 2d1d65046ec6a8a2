"""Versioned datasets in the registry: prepare (dedupe, redact, filter), publish, and `dataset:` references.

Layout, beside the adapters of a registry (a local folder or a storage URI):
    <registry>/_datasets/<name>/v<N>/<split>/part-00000.parquet ...   records as they were read (same keys),
                                                                       redacted; one part per `PART_ROWS`
    <registry>/_datasets/<name>/v<N>/manifest.json                    format, splits and record counts, what
                                                                       `prepare` removed, the audit summary of
                                                                       the result, lineage, sha256 of every file
Versions are published like adapters (staged, then renamed into place; the manifest last on object stores).

A reference `dataset:NAME[@vN][:SPLIT]` works wherever a data path does (`data.train`, `data.validation`,
`eval.data`, `fineray data audit`). Without a registry in the reference it is looked up in the run's
`output.registry` (`fineray train` pins it, version included, before any worker starts), else in
`$FINERAY_REGISTRY`, else `./adapters`. A registry may be given in the reference:
`dataset:s3://bucket/fineray/adapters/tickets@v2`. The split defaults to `train`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fineray.base import storage
from fineray.train.config import RunConfig
from fineray.train.registry import AdapterRegistry, AdapterVersion, RegistryError, sha256_file, validate_name

__all__ = [
    "DATASETS_DIR",
    "PART_ROWS",
    "DatasetRef",
    "DatasetRegistry",
    "PartWriter",
    "audit_summary",
    "default_registry",
    "parse_dataset_ref",
    "pin_dataset_refs",
    "publish_dataset",
    "resolve_dataset",
]

DATASETS_DIR = "_datasets"  # not a valid adapter name, so adapter listings never show it
PART_ROWS = 100_000
PREFIX = "dataset:"
_REF = re.compile(r"^dataset:(?:(?P<root>.+)/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}?)"
                  r"(?:@(?P<ver>v?\d+))?(?::(?P<split>[A-Za-z0-9_-]+))?$")


def default_registry() -> str:
    """Where unqualified `dataset:` references are looked up outside a run: $FINERAY_REGISTRY or ./adapters."""
    return os.environ.get("FINERAY_REGISTRY", "adapters")


@dataclass(frozen=True)
class DatasetRef:
    """A parsed `dataset:[ROOT/]NAME[@vN][:SPLIT]` reference."""

    root: str | None
    name: str
    version: int | None
    split: str = "train"

    def text(self, root: str | None = None, version: int | None = None) -> str:
        """The reference as a string, optionally qualified with a registry and pinned to a version."""
        r, v = root or self.root, version or self.version
        return (f"{PREFIX}{r.rstrip('/') + '/' if r else ''}{self.name}{f'@v{v}' if v else ''}"
                f"{'' if self.split == 'train' else ':' + self.split}")


def parse_dataset_ref(ref: str) -> DatasetRef:
    """Parse a `dataset:` reference.

    Raises:
        RegistryError: the reference does not look like `dataset:NAME[@vN][:SPLIT]`.
    """
    m = _REF.match(ref)
    if not m or ".." in m.group("name"):
        raise RegistryError(f"invalid dataset reference {ref!r}: use dataset:NAME, dataset:NAME@v2, "
                            "dataset:NAME@v2:validation or dataset:REGISTRY/NAME@v2")
    ver = m.group("ver")
    return DatasetRef(m.group("root"), m.group("name"), int(ver.lstrip("v")) if ver else None,
                      m.group("split") or "train")


class DatasetRegistry(AdapterRegistry):
    """The datasets of a registry: `AdapterRegistry` versioning and atomic publish under `_datasets/`."""

    kind = "dataset"

    def __init__(self, root: str):
        self.registry_root = root
        super().__init__(storage.join(root, DATASETS_DIR))

    def local_path(self, ref: str) -> Path:
        """A local folder with the version's files; remote versions are downloaded once and verified."""
        path = super().local_path(ref)
        if storage.is_remote(self.root) and not (path / ".verified").exists():
            bad = [rel for rel, digest in self.get(ref).manifest["files"].items()
                   if not (path / rel).is_file() or sha256_file(path / rel) != digest]
            if bad:
                shutil.rmtree(path, ignore_errors=True)
                raise RegistryError(f"dataset {ref} in {self.registry_root}: sha256 mismatch for {bad}")
            (path / ".verified").touch()
        return path


def resolve_dataset(ref: str) -> Path:
    """The local folder of Parquet parts a `dataset:` reference names (its split)."""
    r = parse_dataset_ref(ref)
    reg = DatasetRegistry(r.root or default_registry())
    version = reg.get(f"{r.name}@v{r.version}" if r.version else r.name)
    splits = version.manifest.get("splits", {})
    if r.split not in splits:
        raise RegistryError(f"dataset {version.ref} has no split {r.split!r} (has {sorted(splits)})")
    return reg.local_path(version.ref) / r.split


def pin_dataset_refs(cfg: RunConfig) -> list[str]:
    """Qualify and pin every `dataset:` reference of a run config in place (registry: `output.registry`,
    version: the latest when none is given), so every worker reads the same version; returns `name@vN`
    of each for the adapter's lineage."""
    pinned: list[str] = []

    def pin(path: str) -> str:
        if not isinstance(path, str) or not path.startswith(PREFIX):
            return path
        r = parse_dataset_ref(path)
        root = r.root or cfg.output.registry
        reg = DatasetRegistry(root)
        v = reg.get(f"{r.name}@v{r.version}" if r.version else r.name)
        pinned.append(v.ref + ("" if r.split == "train" else f":{r.split}"))
        return r.text(root=root if storage.is_remote(root) else str(Path(root).expanduser().resolve()),
                      version=v.version)

    d = cfg.data
    if isinstance(d.train, str):
        d.train = pin(d.train)
    else:
        for spec in d.train:
            spec.path = pin(spec.path)
    if isinstance(d.validation, str):
        d.validation = pin(d.validation)
    if cfg.eval.data:
        cfg.eval.data = pin(cfg.eval.data)
    return pinned


class PartWriter:
    """Records (dicts) to Parquet part files of at most `rows` rows each, in a folder."""

    def __init__(self, folder: Path, rows: int = PART_ROWS):
        self.folder, self.rows = folder, rows
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buf: list[dict[str, Any]] = []
        self.parts = self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        self._buf.append(record)
        self.count += 1
        if len(self._buf) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.folder / f"part-{self.parts:05d}.parquet"
        try:
            table = pa.Table.from_pylist(self._buf)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"records {self.count - len(self._buf)}..{self.count - 1} cannot be stored as "
                             f"Parquet: a field has values of different types ({e})") from None
        pq.write_table(table, path, compression="zstd")
        self.parts += 1
        self._buf = []


def audit_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of an audit report kept in a dataset manifest: totals and per-split counts, no findings."""
    splits = {n: {k: v for k, v in s.items() if k not in ("sources", "tokens")} for n, s in report["splits"].items()}
    for n, s in report["splits"].items():
        if s.get("tokens"):
            splits[n]["tokens"] = {k: s["tokens"][k] for k in ("min", "p50", "p95", "max")}
    return {"totals": report["totals"], "leakage": report["leakage"], "splits": splits,
            "settings": report["settings"]}


def publish_dataset(registry: str, name: str, splits: dict[str, Iterable[dict[str, Any]]], fields: dict[str, Any],
                    *, audit: Callable[[dict[str, str]], dict[str, Any]] | None = None) -> AdapterVersion:
    """Write each split's records to Parquet parts in a staging folder and publish them as the next version.

    Args:
        splits: split name -> records (consumed once, streamed to disk).
        fields: manifest fields (format, what was done, lineage).
        audit: called with {split: staged folder} before publishing; its report's summary goes in the manifest.

    Raises:
        RegistryError: bad name or a split without records.
    """
    validate_name(name)
    with tempfile.TemporaryDirectory(prefix="fineray-dataset-") as tmp:
        counts = {}
        for split, records in splits.items():
            w = PartWriter(Path(tmp) / split)
            for rec in records:
                w.add(rec)
            w.flush()
            if not w.count:
                raise RegistryError(f"dataset {name!r}: split {split!r} has no records left")
            counts[split] = w.count
        manifest = {"kind": "dataset", **fields,
                    "splits": {s: {"records": n, **fields.get("splits", {}).get(s, {})} for s, n in counts.items()}}
        if audit is not None:
            manifest["audit"] = audit_summary(audit({s: str(Path(tmp) / s) for s in counts}))
        return DatasetRegistry(registry).publish(name, tmp, manifest)
