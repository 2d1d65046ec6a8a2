"""The package's dependency order holds: base <- train <- {tune, federated, serve, cluster} <- cli, with rl (GRPO)
above serve, whose engine generates its rollouts. Read from the source with `ast` (every import, also those
inside functions), so it fails on the commit that breaks it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fineray"

#: component -> the other components it may import.
ALLOWED = {
    "base": set(),
    "train": {"base"},
    "tune": {"base", "train"},
    "federated": {"base", "train"},
    "serve": {"base", "train"},
    "cluster": {"base", "train"},
    "rl": {"base", "train", "serve"},
    "cli": {"base", "train", "tune", "federated", "serve", "cluster", "rl"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """`fineray.train.loop` -> `train`; the CLI modules -> `cli`; the root package (version only) -> `base`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] == "cli" or parts[1].startswith("_cli"):
        return "cli"
    return parts[1]


def _imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported fineray module, line) of a source file; relative imports resolved."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            # `from fineray.base import storage` imports the module fineray.base.storage
            found += [(f"{name}.{a.name}", node.lineno) for a in node.names
                      if (ROOT.parent / f"{name}.{a.name}".replace(".", "/")).with_suffix(".py").exists()]
    return [(n, line) for n, line in found if n == "fineray" or n.startswith("fineray.")]


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_component_is_known() -> None:
    # Prepare / Execute
    components = {component(_module_name(p)) for p in _sources()}
    # Assert: a new top-level package must be given its place in the order
    assert components <= set(ALLOWED), components - set(ALLOWED)


def test_no_import_runs_against_the_dependency_order() -> None:
    # Prepare / Execute
    wrong = []
    for path in _sources():
        src = component(_module_name(path))
        for name, line in _imports(path):
            dst = component(name)
            if dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {name} ({dst})")
    # Assert
    assert not wrong, "\n".join(wrong)


def test_the_allowed_order_has_no_cycles() -> None:
    # Execute: depth-first search over ALLOWED
    state: dict[str, int] = {}

    def visit(c: str, trail: list[str]) -> None:
        if state.get(c) == 1:
            pytest.fail(f"cycle: {' -> '.join([*trail, c])}")
        if state.get(c) == 2:
            return
        state[c] = 1
        for d in ALLOWED[c]:
            visit(d, [*trail, c])
        state[c] = 2

    # Assert (inside visit)
    for c in ALLOWED:
        visit(c, [])


def test_no_module_import_cycles() -> None:
    """Top-level imports between modules form no cycle (imports inside functions may, as they run later)."""
    # Prepare
    modules = {_module_name(p): p for p in _sources()}
    graph = {m: {n for n, _ in _imports(p, top_level_only=True) if n in modules and n != m}
             for m, p in modules.items()}
    # Execute
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            cycles.append(" -> ".join([*trail[trail.index(m):], m]))
            return
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # Assert
    assert not cycles, "\n".join(cycles)
