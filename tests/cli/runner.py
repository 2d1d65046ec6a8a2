"""The `fineray` CLI in-process through typer's runner: the same commands, options and exit codes as a user's
shell gets, without a Python start per call (~4 s each here). The end-to-end test in test_cli.py still runs the
console script in real subprocesses."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from typer.testing import CliRunner

from fineray.cli import app


def invoke(*args: str, cwd: Path, check: bool = True) -> SimpleNamespace:
    """`fineray ARGS` run in `cwd`; returncode, stdout and stderr as a subprocess would give them."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    finally:
        os.chdir(old)
    out = SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)
    if check and r.exit_code != 0:
        raise AssertionError(f"fineray {' '.join(args)} failed ({r.exit_code}):\n{r.stdout}\n{r.stderr}\n{r.exception}")
    return out
