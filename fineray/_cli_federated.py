"""`fineray federated`: simulate a federation on one cluster, or run its coordinator and silos over HTTPS."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fineray._cli_common import console, fail, load_run_config, user_errors

__all__ = ["FEDERATED_COMMANDS", "federated_app"]

federated_app = typer.Typer(help="Federated LoRA fine-tuning across data silos.", invoke_without_command=True)

#: Subcommands of `fineray federated`; any other first argument is a config for the (hidden) `run` command.
FEDERATED_COMMANDS = ("run", "coordinator", "silo", "certs")


@federated_app.callback()
def federated(ctx: typer.Context) -> None:
    """`fineray federated CONFIG [key=value ...]` simulates the federation on one Ray cluster;
    `coordinator` and `silo` run it across organisations over HTTPS."""


@federated_app.command("run", hidden=True)
def federated_run(config: Path = typer.Argument(...), overrides: list[str] | None = typer.Argument(None),
                  no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Simulate a federation: every silo a Ray actor on one cluster."""
    cfg = load_run_config(config, list(overrides or []))
    from fineray.federated import print_federation, run_simulation

    try:
        result = run_simulation(cfg, progress=not no_progress, console=console)
    except (ValueError, RuntimeError, *user_errors()) as e:
        fail(str(e), 1)
    print_federation(result, console)


@federated_app.command("coordinator")
def federated_coordinator(config: Path = typer.Argument(...), overrides: list[str] | None = typer.Argument(None),
                          host: str = typer.Option("0.0.0.0"), port: int = typer.Option(8443),
                          cert: str | None = typer.Option(None, help="Server certificate (PEM)."),
                          key: str | None = typer.Option(None, help="Server private key (PEM)."),
                          ca: str | None = typer.Option(None, help="CA of the silos' client certs (mutual TLS)."),
                          tokens: Path | None = typer.Option(None, help="YAML/JSON {silo: token} file.")) -> None:
    """Run the aggregator: silos connect over HTTPS; only adapter tensors (safetensors) travel."""
    cfg = load_run_config(config, list(overrides or []))
    from fineray.federated import print_federation, run_coordinator
    from fineray.federated.server import load_tokens

    try:
        tok = load_tokens(str(tokens)) if tokens else None
        result = run_coordinator(cfg, host, port, cert, key, ca, tok, console=console)
    except (ValueError, RuntimeError, *user_errors()) as e:
        fail(str(e), 1)
    if result is not None:
        print_federation(result, console)


@federated_app.command("silo")
def federated_silo(coordinator: str = typer.Option(..., help="https://HOST:PORT of the coordinator."),
                   name: str = typer.Option(..., help="This silo's name."),
                   data: str = typer.Option(..., help="Private training data (never leaves this machine)."),
                   token: str | None = typer.Option(None, envvar="FINERAY_SILO_TOKEN"),
                   ca: str | None = typer.Option(None), cert: str | None = typer.Option(None),
                   key: str | None = typer.Option(None),
                   trainer: str = typer.Option("ray", help="ray (Ray Train) | local"),
                   overrides: list[str] | None = typer.Argument(None)) -> None:
    """Run one organisation's silo: trains locally, sends only its adapter update."""
    from fineray.federated import run_silo

    try:
        out = run_silo(coordinator, name, data, token, ca=ca, cert=cert, key=key, trainer=trainer,
                       overrides=list(overrides or []))
    except (ValueError, RuntimeError, TimeoutError, PermissionError, *user_errors()) as e:
        fail(str(e), 1)  # PermissionError: SiloAuthError, the coordinator refused the token or certificate
    console.print_json(json.dumps(out, default=str))


@federated_app.command("certs")
def federated_certs(out_dir: Path = typer.Argument(..., help="Folder for the CA, server and silo certificates."),
                    silo: list[str] = typer.Option(..., "--silo", help="Silo name (repeatable)."),
                    host: list[str] | None = typer.Option(None, "--host", help="Coordinator host names/IPs.")) -> None:
    """Generate a CA, a coordinator certificate and one client certificate per silo (for trials and tests)."""
    from fineray.federated import generate_pki

    files = generate_pki(out_dir, silo, hosts=tuple(host or ("127.0.0.1", "localhost")))
    for who, (cert, key) in files.items():
        console.print(f"{who}: {cert} {key}", highlight=False)
