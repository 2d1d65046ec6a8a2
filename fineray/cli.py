"""The `fineray` command line: parse, load the config, call a component. Components are imported lazily so
`fineray --help` and config errors are instant.

This module is the entry point (`fineray = "fineray.cli:main"`, `python -m fineray.cli`): it builds the app and
registers the commands, which live beside it by component: `_cli_train` (train, eval, export, plan, tune),
`_cli_rl` (rl), `_cli_serve` (serve, generate, score), `_cli_cluster` (submit, jobs, k8s), `_cli_registry`,
`_cli_data` (audit, prepare, from-feedback) and `_cli_federated`;
`_cli_common` holds what they share.
"""

from __future__ import annotations

import os
import sys

import typer

from fineray._cli_cluster import jobs_app, k8s_app, submit
from fineray._cli_common import print_summary
from fineray._cli_data import data_app
from fineray._cli_federated import FEDERATED_COMMANDS, federated_app
from fineray._cli_registry import adapters_app
from fineray._cli_rl import rl
from fineray._cli_serve import generate, score, serve
from fineray._cli_train import eval_cmd, export, plan, train, tune

__all__ = ["app", "main", "print_summary"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs on Ray: train, rl, tune, federated, serve, submit; audit and version data.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(k8s_app, name="k8s")
app.add_typer(federated_app, name="federated")
# Registration order is the order `fineray --help` lists the commands in.
app.command()(train)
app.command("eval")(eval_cmd)
app.command()(export)
app.command()(plan)
app.command()(tune)
app.command()(rl)
app.command()(serve)
app.command()(generate)
app.command()(score)
app.command()(submit)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:]
    # `fineray federated CONFIG ...` (simulation) is the `run` subcommand; keep the short form users type.
    if len(argv) >= 2 and argv[0] == "federated" and argv[1] not in (*FEDERATED_COMMANDS, "--help", "-h"):
        sys.argv.insert(2, "run")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
