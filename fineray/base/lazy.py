"""Lazy package exports: importing a package stays cheap, and an exported name's module loads on first use.

A package lists its exports in `__all__` and maps each lazy one to the module that defines it:

    __all__ = ["run_sweep", ...]
    __getattr__, __dir__ = lazy_exports(__name__, {"run_sweep": "fineray.tune.sweep", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level `__getattr__` and `__dir__` for a package whose exports are imported on first access.

    Args:
        package: the package's `__name__`.
        where: exported name -> the module that defines it (absolute, or relative to `package` when it starts
            with a dot). The module is imported when the name is first read; nothing is imported before.

    Returns:
        `(__getattr__, __dir__)`, to assign in the package's `__init__`. `__getattr__` raises `AttributeError`
        for names not in `where`; `__dir__` lists the package's globals plus the lazy names.
    """
    where = dict(where)

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
