"""`fineray submit`, `fineray jobs ...` and `fineray k8s ...`: runs on a Ray cluster (Ray Jobs API, KubeRay)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from fineray._cli_common import check_kind_section, console, err, fail, fmt, load_run_config
from fineray.base.runs import KINDS

__all__ = ["jobs_app", "k8s_app", "submit"]

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster (Ray Jobs API).")
k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests.")

_ADDRESS_HELP = "Ray dashboard URL, e.g. http://ray-head:8265 (default: $RAY_ADDRESS)."
_KINDS_HELP = " | ".join(KINDS)
_TOKEN_HELP = "Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."


def _env_pairs(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            fail(f"--env {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def submit(config: Path = typer.Argument(..., help="Run config YAML."),
           overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
           address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
           kind: str = typer.Option("train", "--kind", help=_KINDS_HELP),
           wait: bool = typer.Option(False, "--wait", help="Follow the logs; exit with the job's status."),
           storage: str | None = typer.Option(None, "--storage",
                                                 help="Base for relative output.dir/output.registry (s3://..., gs://..., shared path)."),
           ship_code: bool = typer.Option(True, "--ship-code/--no-ship-code",
                                          help="Ship this fineray package with the job (off: use the cluster's)."),
           ship_data: bool | None = typer.Option(None, "--ship-data/--no-ship-data",
                                                    help="Upload local data files with the job (default: remote clusters only)."),
           env: list[str] | None = typer.Option(None, "--env", help="KEY=VALUE for the job (repeatable)."),
           token: str | None = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Submit a fineray run to a Ray cluster (Ray Jobs API)."""
    overrides = list(overrides or [])
    cfg = load_run_config(config, overrides)
    check_kind_section(cfg, kind)
    from fineray.cluster.jobs import JobError, submit_run, wait_for_job

    try:
        sub = submit_run(cfg, kind, address, overrides=overrides, ship_code=ship_code, token=token,
                         storage=storage, ship_data=ship_data, env=_env_pairs(env))
    except JobError as e:
        fail(str(e), 1)
    for note in sub.notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    console.print(f"submitted [bold]{sub.submission_id}[/] to {sub.address}", highlight=False)
    console.print(f"  run dir  {sub.output_dir}/{sub.name}\n  adapter  {sub.registry} (name {sub.name})",
                  highlight=False)
    if not wait:
        console.print(f"  follow   fineray jobs logs {sub.submission_id} --follow --address {sub.address}",
                      highlight=False)
        return
    try:
        code = wait_for_job(sub.address, sub.submission_id, token=token)
    except JobError as e:
        fail(str(e), 1)
    raise typer.Exit(code)


@jobs_app.command("list")
def jobs_list(address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
              all_jobs: bool = typer.Option(False, "--all", help="Also jobs not submitted by fineray."),
              token: str | None = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Jobs on the cluster, oldest first."""
    from fineray.cluster.jobs import JobError, list_jobs

    try:
        rows = list_jobs(address, token, fineray_only=not all_jobs)
    except JobError as e:
        fail(str(e), 1)
    t = Table(title="jobs")
    for col in ("submission id", "status", "kind", "name", "user", "started", "duration_s", "exit"):
        t.add_column(col)
    for j in rows:
        t.add_row(j["submission_id"], j["status"], fmt(j["kind"]), fmt(j["name"]), fmt(j["user"]),
                  fmt(j["start_time"]), fmt(j["duration_s"]), fmt(j["exit_code"]))
    console.print(t)


@jobs_app.command("status")
def jobs_status(job: str = typer.Argument(..., help="Submission id."),
                address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
                token: str | None = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """One job's status, exit code, outputs and metadata (JSON)."""
    from fineray.cluster.jobs import JobError, job_status

    try:
        info = job_status(address, job, token)
    except JobError as e:
        fail(str(e), 1)
    console.print_json(json.dumps(info, default=str))


@jobs_app.command("logs")
def jobs_logs(job: str = typer.Argument(..., help="Submission id."),
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
              address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token: str | None = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """A job's driver logs (stdout/stderr of `fineray <kind>` on the cluster)."""
    from fineray.cluster.jobs import JobError, job_logs

    try:  # plain stdout, not rich: logs contain [brackets] that rich would read as markup
        job_logs(address, job, follow=follow, out=sys.stdout, token=token)
    except JobError as e:
        fail(str(e), 1)


@jobs_app.command("stop")
def jobs_stop(job: str = typer.Argument(..., help="Submission id."),
              address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
              token: str | None = typer.Option(None, "--token", help=_TOKEN_HELP)) -> None:
    """Stop a running job (SIGTERM, then SIGKILL after Ray's grace period)."""
    from fineray.cluster.jobs import JobError, stop_job

    try:
        status = stop_job(address, job, token=token)
    except JobError as e:
        fail(str(e), 1)
    console.print(f"job {job}: {status}", highlight=False)
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- k8s
@k8s_app.command("render")
def k8s_render(config: Path = typer.Argument(..., help="Run config YAML."),
               overrides: list[str] | None = typer.Argument(None),
               image: str = typer.Option(..., help="Container image, e.g. REGISTRY/fineray:TAG."),
               kind: str = typer.Option("train", help=_KINDS_HELP),
               name: str | None = typer.Option(None, help="RayJob name (default from output.name)."),
               namespace: str | None = typer.Option(None),
               storage: str = typer.Option("/mnt/fineray", help="Shared storage mount or URI for outputs.")) -> None:
    """Render a KubeRay RayJob (plus its ConfigMap) for a run config; workers/GPUs/CPUs from `scaling`."""
    cfg = load_run_config(config, list(overrides or []))
    check_kind_section(cfg, kind)
    from fineray.cluster.k8s import dump_yaml, render_rayjob, validate_manifest

    try:
        objs = render_rayjob(cfg.to_dict(), kind, image, name=name, storage=storage, namespace=namespace)
    except (ValueError, TypeError) as e:
        fail(str(e))
    problems = [p for o in objs for p in validate_manifest(o)]
    if problems:
        fail("rendered manifest does not validate:\n  " + "\n  ".join(problems), 1)
    sys.stdout.write(dump_yaml(objs))


@k8s_app.command("validate")
def k8s_validate(files: list[Path] = typer.Argument(..., help="Manifest YAML files (multi-document allowed).")) -> None:
    """Validate manifests against the KubeRay CRD schemas and core Kubernetes schemas."""
    from fineray.cluster.k8s import load_yaml_documents, validate_manifest

    bad = 0
    for f in files:
        for i, doc in enumerate(load_yaml_documents(f.read_text())):
            for p in validate_manifest(doc):
                bad += 1
                err.print(f"{f}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {p}")
    if bad:
        raise typer.Exit(1)
    console.print(f"{len(files)} file(s) valid")
