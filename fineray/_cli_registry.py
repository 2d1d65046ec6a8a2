"""`fineray adapters list|show|rm`: the adapter registry."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from fineray._cli_common import console, fail, fmt

__all__ = ["adapters_app"]

adapters_app = typer.Typer(no_args_is_help=True, help="List, show and remove registered adapters.")


def _registry(registry: str) -> Any:
    from fineray.train.registry import AdapterRegistry

    return AdapterRegistry(registry)


@adapters_app.command("list")
def adapters_list(registry: str = typer.Option("adapters", help="Adapter registry (path or URI).")) -> None:
    """Every adapter version in the registry."""
    t = Table(title=f"adapters in {registry}")
    for col in ("adapter", "base", "method", "created", "val_loss", "key metric"):
        t.add_column(col)
    for v in _registry(registry).list():
        m = v.manifest.get("metrics", {})
        key = next((f"{k}={fmt(m[k])}" for k in ("field_accuracy", "exact_match", "rouge_l") if k in m), "")
        t.add_row(v.ref, v.manifest.get("base_model", ""), v.manifest.get("method", ""),
                  v.manifest.get("created", ""), fmt(m.get("val_loss")), key)
    console.print(t)


@adapters_app.command("show")
def adapters_show(ref: str, registry: str = typer.Option("adapters")) -> None:
    """The manifest of an adapter version (`name` = latest, or `name@vN`), with its lineage chain
    (`lineage_chain`: the datasets it was trained on, its parent adapters)."""
    from fineray.train.registry import RegistryError

    try:
        reg = _registry(registry)
        v = reg.get(ref)
        chain = _lineage(reg, v)
    except RegistryError as e:
        fail(str(e), 1)
    console.print_json(json.dumps({"ref": v.ref, "uri": v.uri, **v.manifest, "lineage_chain": " -> ".join(chain)}))


def _lineage(reg: Any, version: Any) -> list[str]:
    """Each adapter from the oldest ancestor to `version` with the datasets it was trained on, e.g.
    `support-json@v1 (data: dataset:tickets@v1) -> support-json@v2 (data: dataset:tickets-feedback@v1)`."""
    chain, seen, v = [], set(), version
    while v is not None and v.ref not in seen:
        seen.add(v.ref)
        lin = v.manifest.get("lineage") or {}
        data = lin.get("datasets") or []
        chain.insert(0, v.ref + (f" (data: {', '.join('dataset:' + d for d in data)})" if data else ""))
        parent = lin.get("parent")
        if not parent:
            break
        try:
            v = reg.get(parent)
        except Exception:  # noqa: BLE001 - a folder or a removed version: show it and stop
            chain.insert(0, str(parent))
            v = None
    return chain


@adapters_app.command("rm")
def adapters_rm(ref: str, registry: str = typer.Option("adapters"),
                yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Remove an adapter version (`name@vN`) or all its versions (`name`)."""
    from fineray.train.registry import RegistryError

    reg = _registry(registry)
    try:
        if not yes and not typer.confirm(f"remove {ref} from {registry}?"):
            raise typer.Exit(1)
        removed = reg.remove(ref)
    except RegistryError as e:
        fail(str(e), 1)
    console.print("removed " + ", ".join(v.ref for v in removed))
