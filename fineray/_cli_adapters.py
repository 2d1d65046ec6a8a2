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
    """The manifest of an adapter version (`name` = latest, or `name@vN`)."""
    from fineray.train.registry import RegistryError

    try:
        v = _registry(registry).get(ref)
    except RegistryError as e:
        fail(str(e), 1)
    console.print_json(json.dumps({"ref": v.ref, "uri": v.uri, **v.manifest}))


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
