"""Multi-document YAML streams of Kubernetes objects: readable to write, fast to read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

__all__ = ["dump_yaml", "load_yaml_documents", "yaml_loader"]


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (embedded configs, serveConfigV2) as readable `|` blocks.
    if "\n" in data and not any(line != line.rstrip() for line in data.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(objs: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> str:
    """Objects as one multi-document YAML stream (`---` between documents), keys in insertion order."""
    if isinstance(objs, Mapping):
        objs = [objs]
    return yaml.dump_all(
        [dict(o) for o in objs],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        explicit_start=True,
        width=4096,
    )


def yaml_loader() -> type:
    """The fastest safe YAML loader: libyaml's `CSafeLoader` when PyYAML has it, else `SafeLoader`."""
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_documents(text: str) -> list[dict]:
    """The non-empty documents of a (multi-document) YAML stream."""
    return [d for d in yaml.load_all(text, Loader=yaml_loader()) if d is not None]
