"""Submit any fineray run (train, tune, federated, rl) to a Ray cluster through the Ray Jobs API; follow, list, stop.

A submission ships a folder as the job's `working_dir`: the resolved run config (`config.yaml`, every default
written out) plus, for remote clusters, the local data files it names. The entrypoint runs the fineray CLI on the
cluster (`python -m fineray.cli <kind> config.yaml`); the fineray package itself travels as a `py_modules` entry
unless `ship_code=False` (then the cluster image must have fineray installed and `fineray <kind>` is run).

Output paths are made safe for a cluster before shipping: storage URIs (`s3://`, `gs://`) and absolute paths are
kept; relative `output.dir` / `output.registry` go under `storage` when given, become absolute local paths when the
dashboard is on this machine (so the adapter lands in the registry the user expects), and are refused for a remote
cluster (they would be written inside the job's temporary working directory and lost).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml

from fineray.base.runs import check_kind, default_run_name, run_stem, timestamp
from fineray.base.storage import is_remote, join
from fineray.cluster._auth import JobError, connect, is_local_address, resolve_address, translate_error
from fineray.train.config import RunConfig, config_hash, file_fields, validate_config

__all__ = [
    "CONFIG_NAME",
    "EXIT_CODES",
    "JobError",
    "StagedRun",
    "Submission",
    "describe_outcome",
    "entrypoint_for",
    "job_logs",
    "job_metadata",
    "job_status",
    "list_jobs",
    "resolve_address",
    "runtime_env_for",
    "stage_run",
    "stop_job",
    "submission_id_for",
    "submit_job",
    "submit_run",
    "wait_for_job",
]

#: Process exit status of `fineray submit --wait` / `fineray jobs ...` per terminal job status (130 = like Ctrl-C).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
CONFIG_NAME = "config.yaml"
#: The dashboard accepts packages up to 100 MiB; bigger data belongs on shared storage anyway.
MAX_SHIPPED_DATA = 90 * 2**20
_FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------------------------ staging
@dataclass
class StagedRun:
    """The run config as the cluster will run it, the local files shipped with it, and what was rewritten."""

    config: RunConfig
    data_files: dict[str, Path] = field(default_factory=dict)  # path inside working_dir -> local source
    notes: list[str] = field(default_factory=list)


def _place_output(value: str, key: str, *, local: bool, storage: str | None, notes: list[str]) -> str:
    if is_remote(value) or Path(value.removeprefix("file://")).is_absolute():
        return value
    if storage:
        new = join(storage, value)
    elif local:
        new = str(Path(value).expanduser().resolve())
    else:
        raise JobError(f"{key} is a relative path ({value!r}): on a remote Ray cluster it would be written inside "
                       f"the job's temporary working directory and lost. Pass --storage s3://bucket/prefix (or a "
                       f"path every node shares, e.g. /mnt/fineray), or set {key} to a storage URI or absolute path")
    notes.append(f"{key}: {value} -> {new}")
    return new


def stage_run(cfg: RunConfig, *, local: bool, storage: str | None = None, ship_data: bool | None = None,
              kind: str = "train") -> StagedRun:
    """The config to ship: cluster address `auto`, a fixed `output.name`, cluster-safe output and data paths.

    Args:
        cfg: the run config as loaded locally (overrides applied; not modified).
        local: the dashboard runs on this machine (relative outputs become absolute local paths).
        storage: base URI or shared path for relative `output.dir` / `output.registry`.
        ship_data: copy local data files into the job's working dir (default: only for a remote cluster).
        kind: the run kind (names the run when `output.name` is empty, as that command would).

    Raises:
        JobError: a relative output path for a remote cluster without `storage`, or too much data to ship.
    """
    data = cfg.to_dict()
    notes: list[str] = []
    data["cluster"] = {"address": "auto", "num_cpus": None}  # join the job's cluster (RAY_ADDRESS in the job)
    out = data["output"]
    if not out.get("name"):  # fixed here so the run dir and the registry name are known at submit time
        strategy = (cfg.federated or {}).get("strategy")
        out["name"] = default_run_name(kind, model=cfg.model.base, method=cfg.method,
                                       strategy=strategy if isinstance(strategy, str) else "")
    for key in ("dir", "registry"):
        out[key] = _place_output(out[key], f"output.{key}", local=local, storage=storage, notes=notes)
    adapter = data["model"].get("adapter")
    if local and adapter and not Path(adapter).is_absolute() and Path(adapter).expanduser().exists():
        data["model"]["adapter"] = str(Path(adapter).expanduser().resolve())  # a folder, not a registry name
    ship = (not local) if ship_data is None else ship_data
    files: dict[str, Path] = {}
    total = 0
    for container, key, label in file_fields(data):
        ref = container[key]
        path = Path(ref).expanduser()
        if not path.exists():
            continue  # may exist on the cluster (a shared path); the job names it if not
        if ship:
            rel = f"data/{len(files)}-{path.name}"
            files[rel] = path.resolve()
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
                else path.stat().st_size
            container[key] = rel
            notes.append(f"{label}: {ref} shipped as {rel}")
        elif not path.is_absolute():
            container[key] = str(path.resolve())  # the job's cwd is its working dir, not ours
    if total > MAX_SHIPPED_DATA:
        raise JobError(f"the data files to ship total {total / 2**20:.0f} MiB (limit {MAX_SHIPPED_DATA // 2**20} "
                       "MiB per Ray Jobs upload): put them on shared storage (s3://, gs://, a shared path) and "
                       "point data.train / data.validation / eval.data there")
    return StagedRun(validate_config(data, "submitted config"), files, notes)


def submission_id_for(kind: str, name: str | None, now: datetime | None = None) -> str:
    """`fineray-<kind>-<name>-<yyyymmdd-hhmmss>-<4 hex>` (name cleaned to `[a-z0-9-]`, at most 40 chars)."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_stem(name or "run").lower()).strip("-")[:40].rstrip("-") or "run"
    return f"fineray-{kind}-{slug}-{timestamp(now)}-{secrets.token_hex(2)}"


def entrypoint_for(kind: str, config_name: str = CONFIG_NAME, *, ship_code: bool = True) -> str:
    """The job's shell command: the fineray CLI on the shipped config (run from the job's working dir)."""
    cmd = ["python", "-m", "fineray.cli"] if ship_code else ["fineray"]
    return shlex.join([*cmd, kind, config_name])


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers without a passwd entry
        return os.environ.get("USER", "unknown")


def job_metadata(cfg: RunConfig, kind: str, staged: RunConfig, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Ray job metadata (strings): kind, hash of the submitted config, user, run name, output locations."""
    import fineray

    return {"app": "fineray", "kind": kind, "config_hash": config_hash(cfg), "user": _user(),
            "name": staged.output.name or "", "output_dir": staged.output.dir, "registry": staged.output.registry,
            "overrides": " ".join(overrides), "fineray_version": fineray.__version__}


def runtime_env_for(working_dir: str | Path, *, ship_code: bool = True,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime env: the staged folder as working_dir, fineray as a py_module, unbuffered output."""
    import fineray

    # COLUMNS: rich (the CLI's console) wraps at 80 columns when not on a terminal, splitting error lines.
    renv: dict[str, Any] = {"working_dir": str(working_dir),
                            "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
                                         **(env or {})}}
    if ship_code:
        renv["py_modules"] = [str(Path(fineray.__file__).resolve().parent)]
        renv["excludes"] = ["__pycache__/", "*.pyc"]
    return renv


# ------------------------------------------------------------------------------------------------ submit
@dataclass
class Submission:
    """A submitted job: where it runs, what it runs, and where its outputs go."""

    submission_id: str
    address: str
    kind: str
    name: str
    output_dir: str
    registry: str
    entrypoint: str
    notes: list[str] = field(default_factory=list)  # config rewrites made for the cluster (paths, shipped data)


def submit_run(cfg: RunConfig, kind: str, address: str | None = None, *, config_name: str = CONFIG_NAME,
               overrides: Sequence[str] = (), ship_code: bool = True, token: str | None = None,
               storage: str | None = None, ship_data: bool | None = None, env: dict[str, str] | None = None,
               submission_id: str | None = None, agent_wait_s: float = 60.0) -> Submission:
    """Submit a fineray run to the Ray cluster whose dashboard is at `address`.

    Args:
        cfg: the loaded run config (`overrides` already applied; they are only recorded in the metadata).
        kind: `train`, `tune`, `federated` or `rl` (the fineray command run on the cluster).
        address: dashboard URL; default `RAY_API_SERVER_ADDRESS` / `RAY_ADDRESS` (see `resolve_address`).
        config_name: file name of the shipped config inside the working dir.
        ship_code: ship this fineray package with the job (`py_modules`); False runs the cluster's fineray.
        token: Ray auth token (default: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`).
        storage, ship_data: see `stage_run`.
        env: extra environment variables for the job (e.g. `HF_TOKEN`, AWS credentials for s3://).
        submission_id: default `submission_id_for(kind, output.name)`.
        agent_wait_s: how long to retry while a just-started head has no job agent yet.

    Raises:
        JobError: unreachable dashboard, rejected token, unsafe output paths, or a refused submission.
    """
    try:
        check_kind(kind)
    except ValueError as e:
        raise JobError(str(e)) from None
    if not config_name or "/" in config_name or config_name.startswith("."):
        raise JobError(f"config_name must be a plain file name, got {config_name!r}")
    client = connect(address, token)
    url = client.get_address()
    local = is_local_address(url)
    staged = stage_run(cfg, local=local, storage=storage, ship_data=ship_data, kind=kind)
    out = staged.config.output
    sid = submission_id or submission_id_for(kind, out.name)
    entrypoint = entrypoint_for(kind, config_name, ship_code=ship_code)
    env = dict(env or {})
    if local:
        # Ray's state API inside the job (e.g. Ray Train's placement-group cleaner) finds the cluster by scanning
        # for GCS processes and gives up when several Rays run on one machine; point it at this dashboard.
        env.setdefault("RAY_API_SERVER_ADDRESS", url)
    with tempfile.TemporaryDirectory(prefix="fineray-submit-") as tmp:
        (Path(tmp) / config_name).write_text(yaml.safe_dump(staged.config.to_dict(), sort_keys=False))
        for rel, src in staged.data_files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, Path(tmp) / rel)
        renv, meta = runtime_env_for(tmp, ship_code=ship_code, env=env), job_metadata(cfg, kind, staged.config, overrides)
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                sid = _call(client, client.submit_job, entrypoint=entrypoint, submission_id=sid, runtime_env=renv,
                            metadata=meta)
                break
            except JobError as e:
                # A freshly started head answers before its job agent has registered (the dashboard itself
                # waits 10 s per request, then says "No available agent ... try again later").
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)
    return Submission(sid, url, kind, out.name or "", out.dir, out.registry, entrypoint, staged.notes)


def submit_job(cfg: RunConfig, kind: str, address: str | None = None, **kwargs: Any) -> str:
    """`submit_run` returning only the submission id (same arguments)."""
    return submit_run(cfg, kind, address, **kwargs).submission_id


# ------------------------------------------------------------------------------------------------ follow
def _call(client: Any, fn: Any, *args: Any, job_id: str | None = None, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray's client raises RuntimeError/ConnectionError/AuthenticationError
        if job_id and ("does not exist" in str(e) or "status code 404" in str(e)):
            raise JobError(f"no job {job_id!r} on {client.get_address()} (see `fineray jobs list`)") from None
        raise translate_error(e, client.get_address(), *client._fineray_token) from None


def _ts(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds") if ms else None


def _short(message: str | None) -> str | None:
    # Ray appends the last 20,000 characters of the logs to a failed job's message; `job_logs` has them.
    return message.split(", last available logs")[0].strip() if message else message


def _as_dict(d: Any) -> dict[str, Any]:
    meta = dict(d.metadata or {})
    status = str(getattr(d.status, "value", d.status))
    end = d.end_time or (int(time.time() * 1000) if d.start_time else None)
    return {"submission_id": d.submission_id or d.job_id, "status": status, "exit_code": d.driver_exit_code,
            "kind": meta.get("kind"), "name": meta.get("name"), "user": meta.get("user"),
            "config_hash": meta.get("config_hash"), "registry": meta.get("registry"),
            "output_dir": meta.get("output_dir"), "entrypoint": d.entrypoint, "message": _short(d.message),
            "error_type": d.error_type, "start_time": _ts(d.start_time), "end_time": _ts(d.end_time),
            "duration_s": round((end - d.start_time) / 1000, 1) if d.start_time else None, "metadata": meta}


def list_jobs(address: str | None = None, token: str | None = None, *, fineray_only: bool = False) -> list[dict]:
    """Submitted jobs on the cluster, oldest first, as `job_status` dicts (`kind` is None for non-fineray jobs)."""
    client = connect(address, token)
    jobs = [_as_dict(d) for d in _call(client, client.list_jobs) if d.submission_id]
    if fineray_only:
        jobs = [j for j in jobs if j["metadata"].get("app") == "fineray"]
    return sorted(jobs, key=lambda j: j["start_time"] or "")


def job_status(address: str | None, job_id: str, token: str | None = None) -> dict[str, Any]:
    """One job: submission_id, status, exit_code, kind, name, user, config_hash, registry, output_dir,
    entrypoint, message, error_type, start_time, end_time, duration_s, metadata."""
    client = connect(address, token)
    return _as_dict(_call(client, client.get_job_info, job_id, job_id=job_id))


def _poll_logs(client: Any, job_id: str, out: IO[str], seen: int, deadline: float | None) -> str:
    text = ""
    while True:
        status = str(_call(client, client.get_job_status, job_id, job_id=job_id))
        text = _call(client, client.get_job_logs, job_id, job_id=job_id)
        if len(text) > seen:
            out.write(text[seen:])
            out.flush()
            seen = len(text)
        if status in _FINAL or (deadline is not None and time.monotonic() > deadline):
            return text
        time.sleep(1.0)


def _follow(client: Any, job_id: str, out: IO[str], deadline: float | None) -> str:
    """Stream the job's logs to `out` until it ends (websocket tail; polling when that fails); return them."""
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    try:
        timeout = None if deadline is None else max(0.1, deadline - time.monotonic())
        asyncio.run(asyncio.wait_for(tail(), timeout))
        return "".join(chunks)
    except TimeoutError:
        return "".join(chunks)
    except Exception:  # noqa: BLE001 - proxies without websockets, a running event loop: poll instead
        return _poll_logs(client, job_id, out, len("".join(chunks)), deadline)


def job_logs(address: str | None, job_id: str, *, follow: bool = False, out: IO[str] | None = None,
             token: str | None = None) -> str:
    """The job's logs. With `follow`, stream them to `out` (default stdout) until the job ends."""
    client = connect(address, token)
    _call(client, client.get_job_status, job_id, job_id=job_id)  # unknown id -> JobError before streaming
    if follow:
        return _follow(client, job_id, out or sys.stdout, None)
    text = _call(client, client.get_job_logs, job_id, job_id=job_id)
    if out is not None:
        out.write(text)
    return text


def describe_outcome(job: dict[str, Any], logs: str = "", tail_lines: int = 30) -> str:
    """What went wrong with a finished job: status, exit status, the error line, the tail of its logs."""
    sid, status = job["submission_id"], job["status"]
    if status == "SUCCEEDED":
        return f"job {sid} succeeded"
    if status == "STOPPED":
        return f"job {sid} was stopped"
    msg = (_short(job.get("message")) or "").splitlines()
    code = job.get("exit_code")
    lines = [f"job {sid} {status}" + (f" (exit status {code})" if code is not None else "")
             + (f": {msg[0]}" if msg else "")]
    log_lines = [ln for ln in logs.rstrip().splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(log_lines) if re.search(r"(^error:|\w+(Error|Exception)\b:)", ln.strip())]
    if errors:
        cause = log_lines[errors[-1]].strip()
        if cause.endswith(":") and errors[-1] + 1 < len(log_lines):  # a message wrapped after its colon
            cause += " " + log_lines[errors[-1] + 1].strip()
        lines.append(f"cause: {cause}")
    if log_lines:
        lines.append(f"--- last {min(tail_lines, len(log_lines))} log lines ---")
        lines += log_lines[-tail_lines:]
    return "\n".join(lines)


def wait_for_job(address: str | None, job_id: str, *, follow_logs: bool = True, out: IO[str] | None = None,
                 err: IO[str] | None = None, token: str | None = None, timeout_s: float | None = None,
                 poll_s: float = 1.0) -> int:
    """Wait for a job to finish (streaming its logs to `out`); return its exit status per `EXIT_CODES`.

    A failed or stopped job is described on `err` (default stderr): exit status, the error line and the tail
    of its logs. Ctrl-C stops waiting, not the job.

    Raises:
        JobError: unreachable cluster, unknown job, or still running after `timeout_s`.
    """
    out, err = out or sys.stdout, err or sys.stderr
    client = connect(address, token)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        logs = _follow(client, job_id, out, deadline) if follow_logs else ""
        while (status := str(_call(client, client.get_job_status, job_id, job_id=job_id))) not in _FINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        err.write(f"\nstopped waiting; job {job_id} keeps running (fineray jobs stop {job_id})\n")
        raise
    if status != "SUCCEEDED":
        job = _as_dict(_call(client, client.get_job_info, job_id, job_id=job_id))
        if status == "FAILED":
            logs = _call(client, client.get_job_logs, job_id, job_id=job_id)
        err.write(describe_outcome(job, logs) + "\n")
        err.flush()
    return EXIT_CODES[status]


def stop_job(address: str | None, job_id: str, *, wait: bool = True, timeout_s: float = 30.0,
             token: str | None = None) -> str:
    """Ask Ray to stop a job (SIGTERM, then SIGKILL after a grace period); return its status afterwards.

    A job that already finished is left alone and its final status returned.
    """
    client = connect(address, token)
    status = str(_call(client, client.get_job_status, job_id, job_id=job_id))
    if status in _FINAL:
        return status
    _call(client, client.stop_job, job_id, job_id=job_id)
    deadline = time.monotonic() + timeout_s
    while wait and status not in _FINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(_call(client, client.get_job_status, job_id, job_id=job_id))
    return status
