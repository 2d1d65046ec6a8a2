"""fineray.cluster.jobs: the submission pieces without Ray (ids, entrypoint, metadata, shipped config, addresses,
tokens), then one private Ray head with token auth on for real submissions: a tiny training job lands its adapter
in the registry, logs show the steps, a long job stops, a broken job reports its data error, a bad address and
a wrong token fail fast with clear errors."""

from __future__ import annotations

import io
import re
import secrets
import socket
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from fineray.cluster import _auth, jobs
from fineray.cluster.jobs import JobError
from fineray.train.config import config_hash, load_config
from tests.ray_head import start_head, stop_head

pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # Ray's log tail

TINY = ["model.base=tiny:llama", "scaling.num_workers=1", "eval.enabled=false", "data.max_examples=32",
        "train.batch_size=2", "train.log_every=1", "train.eval_batches=1", "train.threads_per_worker=1"]


def tiny_cfg(tmp: Path, *extra: str):
    return load_config(None, [*TINY, f"output.dir={tmp}/runs", f"output.registry={tmp}/registry", *extra])


# ------------------------------------------------------------------------------------------- no Ray needed
def test_submission_id_is_readable_and_unique() -> None:
    # Prepare
    now = datetime(2026, 11, 30, 9, 5, 7)
    # Execute
    ids = {jobs.submission_id_for("train", "Support Tickets_v2-20261129-101010", now) for _ in range(20)}
    # Assert
    assert len(ids) > 15  # 4 random hex digits tell same-second submissions apart
    for sid in ids:
        assert re.fullmatch(r"fineray-train-support-tickets-v2-20261130-090507-[0-9a-f]{4}", sid), sid
    assert jobs.submission_id_for("tune", None, now).startswith("fineray-tune-run-20261130-090507-")
    assert len(jobs.submission_id_for("federated", "x" * 200, now)) == len("fineray-federated-") + 40 + 21


def test_entrypoint_runs_the_cli_on_the_shipped_config() -> None:
    assert jobs.entrypoint_for("train") == "python -m fineray.cli train config.yaml"
    assert jobs.entrypoint_for("tune", "my run.yaml", ship_code=False) == "fineray tune 'my run.yaml'"


def test_stage_run_makes_outputs_absolute_for_a_local_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: relative output paths and a relative data file, resolved against the cwd
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    cfg = load_config(None, ["model.base=tiny:llama", "data.train=train.jsonl", "cluster.num_cpus=2"])
    # Execute
    staged = jobs.stage_run(cfg, local=True)
    # Assert
    out = staged.config.output
    assert (out.dir, out.registry) == (str(tmp_path / "runs"), str(tmp_path / "adapters"))
    assert re.fullmatch(r"llama-lora-\d{8}-\d{6}", out.name)
    assert staged.config.data.train == str(tmp_path / "train.jsonl") and staged.data_files == {}
    assert (staged.config.cluster.address, staged.config.cluster.num_cpus) == ("auto", None)
    assert cfg.output.dir == "runs" and cfg.output.name is None  # the caller's config is untouched


def test_stage_run_keeps_uris_and_ships_local_data_to_a_remote_cluster(tmp_path: Path) -> None:
    # Prepare
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "hello"}\n')
    (tmp_path / "ds.json").write_text("{}")
    cfg = load_config(None, [f"data.train={train}", "data.validation=/shared/val.jsonl", "output.name=exp1",
                             "output.dir=s3://bucket/runs", "output.registry=gs://bucket/adapters",
                             f"train.deepspeed.config_file={tmp_path}/ds.json"])
    # Execute
    staged = jobs.stage_run(cfg, local=False)
    # Assert: URIs untouched, the local file shipped, the missing one left for the cluster
    assert (staged.config.output.dir, staged.config.output.registry) == ("s3://bucket/runs", "gs://bucket/adapters")
    assert staged.config.data.train == "data/0-train.jsonl" and staged.data_files["data/0-train.jsonl"] == train
    assert staged.config.data.validation == "/shared/val.jsonl"
    assert staged.config.train.deepspeed.config_file == "data/1-ds.json"
    assert staged.config.data.sources()[0].path == "data/0-train.jsonl"


def test_stage_run_refuses_relative_outputs_on_a_remote_cluster_unless_storage_is_given() -> None:
    cfg = load_config(None, ["output.name=exp1"])
    with pytest.raises(JobError, match=r"output\.dir is a relative path \('runs'\).*--storage"):
        jobs.stage_run(cfg, local=False)
    staged = jobs.stage_run(cfg, local=False, storage="s3://bucket/fineray/")
    assert (staged.config.output.dir, staged.config.output.registry) == (
        "s3://bucket/fineray/runs", "s3://bucket/fineray/adapters")


def test_metadata_and_runtime_env() -> None:
    # Prepare
    cfg = load_config(None, ["model.base=tiny:llama", "output.name=exp1", "output.dir=/data/runs",
                             "output.registry=s3://b/adapters"])
    staged = jobs.stage_run(cfg, local=False)
    # Execute
    meta = jobs.job_metadata(cfg, "train", staged.config, ["train.lr=1e-3"])
    renv = jobs.runtime_env_for("/tmp/work", env={"HF_TOKEN": "x"})
    # Assert
    assert meta["kind"] == "train" and meta["config_hash"] == config_hash(cfg) and len(meta["config_hash"]) == 12
    assert meta["name"] == "exp1" and meta["registry"] == "s3://b/adapters" and meta["overrides"] == "train.lr=1e-3"
    assert meta["user"] and all(isinstance(v, str) for v in meta.values())
    assert renv["working_dir"] == "/tmp/work" and renv["env_vars"]["HF_TOKEN"] == "x"
    assert renv["py_modules"] == [str(Path(jobs.__file__).resolve().parents[1])]
    assert "py_modules" not in jobs.runtime_env_for("/tmp/work", ship_code=False)


def test_resolve_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert jobs.resolve_address(None) == "http://from-env:8265"
    assert jobs.resolve_address("ray-head") == "http://ray-head:8265"  # explicit wins over RAY_ADDRESS
    assert jobs.resolve_address("ray://ray-head:10001") == "http://ray-head:8265"
    assert jobs.resolve_address("https://ray.example.com/") == "https://ray.example.com:443"
    with pytest.raises(JobError, match="GCS port"):
        jobs.resolve_address("10.0.0.1:6379")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(JobError, match="no Ray cluster address"):
        jobs.resolve_address(None)


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert _auth.resolve_token(None) == (None, "no token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("filetok\n")
    assert _auth.resolve_token(None)[0] == "filetok"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "envtok")
    assert _auth.resolve_token(None) == ("envtok", "RAY_AUTH_TOKEN")
    assert _auth.resolve_token("argtok") == ("argtok", "--token")
    assert _auth.auth_headers("argtok") == {"Authorization": "Bearer argtok"}


def test_describe_outcome_names_the_error_and_the_log_tail() -> None:
    job = {"submission_id": "fineray-train-x", "status": "FAILED", "exit_code": 1,
           "message": "Job entrypoint command failed with exit code 1, last available logs (truncated...):\nblah"}
    logs = "\n".join([f"line {i}" for i in range(50)] + ["error: data file not found: /nope.jsonl", "bye"])
    text = jobs.describe_outcome(job, logs, tail_lines=5)
    assert text.splitlines()[0] == ("job fineray-train-x FAILED (exit status 1): "
                                    "Job entrypoint command failed with exit code 1")
    assert "cause: error: data file not found: /nope.jsonl" in text
    assert text.splitlines()[-5:] == ["line 47", "line 48", "line 49", "error: data file not found: /nope.jsonl",
                                      "bye"]
    wrapped = jobs.describe_outcome(job, "error: data file not found:\n/a/long/path.jsonl\n")
    assert "cause: error: data file not found: /a/long/path.jsonl" in wrapped
    assert jobs.describe_outcome({**job, "status": "STOPPED"}) == "job fineray-train-x was stopped"


def test_unreachable_address_fails_fast() -> None:
    # Prepare: a port nothing listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, ["model.base=tiny:llama", "output.dir=/tmp/x", "output.registry=/tmp/y"])
    # Execute
    t0 = time.monotonic()
    with pytest.raises(JobError, match=rf"cannot reach the Ray dashboard at http://127\.0\.0\.1:{port}: "):
        jobs.submit_job(cfg, "train", f"127.0.0.1:{port}", token="x")
    # Assert
    assert time.monotonic() - t0 < 5
    with pytest.raises(JobError, match="kind must be one of"):
        jobs.submit_job(cfg, "serve", f"127.0.0.1:{port}")


# ------------------------------------------------------------------------------------------- a private Ray head
@pytest.fixture(scope="module")
def head():
    """A private Ray head (dashboard on, token auth on with a fresh token) stopped at the end by PID."""
    token = secrets.token_hex(16)
    try:
        proc, temp, url = start_head(token=token)
    except RuntimeError:  # one retry: a loaded 2-core machine can miss Ray's fixed 30 s raylet start-up limit
        proc, temp, url = start_head(token=token)
    try:
        yield {"url": url, "token": token, "temp": temp}
    finally:
        stop_head(proc, temp)


@pytest.fixture(scope="module")
def trained(head, tmp_path_factory):
    """One tiny training job, submitted and waited for with its logs followed (the logs test reuses it)."""
    tmp = tmp_path_factory.mktemp("jobs")
    cfg = tiny_cfg(tmp, "train.max_steps=3", "output.name=jobs-tiny")
    t0 = time.monotonic()
    sub = jobs.submit_run(cfg, "train", head["url"], token=head["token"], overrides=["train.max_steps=3"])
    out, err = io.StringIO(), io.StringIO()
    code = jobs.wait_for_job(head["url"], sub.submission_id, out=out, err=err, token=head["token"], timeout_s=400)
    return {"sid": sub.submission_id, "sub": sub, "code": code, "out": out.getvalue(), "err": err.getvalue(),
            "tmp": tmp, "wall_s": time.monotonic() - t0}


@pytest.mark.integration
def test_wrong_or_missing_token_is_rejected(head) -> None:
    with pytest.raises(JobError, match=r"the Ray cluster rejected the auth token \(403: invalid token, from --token\)"):
        jobs.list_jobs(head["url"], token="not-the-token")
    r = httpx.get(f"{head['url']}/api/jobs/", timeout=5)  # what a client without the header gets
    with pytest.raises(JobError, match=r"rejected the auth token \(401: no token was sent\)"):
        _auth.raise_for_auth(r.status_code, head["url"], None, "no token")


@pytest.mark.integration
def test_submit_train_job_registers_the_adapter(head, trained) -> None:
    from fineray.train.registry import AdapterRegistry

    assert trained["code"] == 0, trained["err"] + trained["out"][-3000:]
    assert re.fullmatch(r"fineray-train-jobs-tiny-\d{8}-\d{6}-[0-9a-f]{4}", trained["sid"])
    sub = trained["sub"]
    assert (sub.address, sub.kind, sub.name) == (head["url"], "train", "jobs-tiny")
    assert sub.registry == str(trained["tmp"] / "registry") and sub.notes == []  # absolute paths kept as they are
    version = AdapterRegistry(str(trained["tmp"] / "registry")).get("jobs-tiny")
    assert version.manifest["base_model"] == "tiny:llama" and version.manifest["metrics"]["steps"] == 3
    assert (trained["tmp"] / "runs" / "jobs-tiny" / "summary.json").is_file()
    print(f"tiny train job wall: {trained['wall_s']:.1f} s")


@pytest.mark.integration
def test_job_logs_status_and_list(head, trained) -> None:
    # Execute
    logs = jobs.job_logs(head["url"], trained["sid"], token=head["token"])
    status = jobs.job_status(head["url"], trained["sid"], token=head["token"])
    listed = jobs.list_jobs(head["url"], token=head["token"], fineray_only=True)
    # Assert: progress lines of all 3 steps, followed live by --wait as well
    steps = sorted({int(m) for m in re.findall(r"\[fineray\] step=(\d+)", logs)})
    assert steps == [1, 2, 3], logs[-2000:]
    assert "[fineray] step=3" in trained["out"]
    assert status["status"] == "SUCCEEDED" and status["exit_code"] == 0 and status["kind"] == "train"
    assert status["name"] == "jobs-tiny" and status["registry"] == str(trained["tmp"] / "registry")
    assert status["entrypoint"] == "python -m fineray.cli train config.yaml"
    assert trained["sid"] in [j["submission_id"] for j in listed]
    with pytest.raises(JobError, match="no job 'nope'"):
        jobs.job_status(head["url"], "nope", token=head["token"])


@pytest.mark.integration
def test_failing_job_reports_exit_status_and_the_data_error(head, tmp_path: Path) -> None:
    # Prepare
    cfg = tiny_cfg(tmp_path, f"data.train={tmp_path}/missing.jsonl", "output.name=broken")
    # Execute
    sid = jobs.submit_job(cfg, "train", head["url"], token=head["token"])
    err = io.StringIO()
    code = jobs.wait_for_job(head["url"], sid, follow_logs=False, err=err, token=head["token"], timeout_s=240)
    # Assert
    text = err.getvalue()
    assert code == 1, text
    assert f"job {sid} FAILED (exit status 1)" in text
    assert re.search(r"cause: .*missing\.jsonl", text), text
    assert "--- last" in text


@pytest.mark.integration
def test_stop_job_stops_a_long_training_job(head, tmp_path: Path) -> None:
    # Prepare: a 100000-step run, stopped once its driver runs. (Stopping it mid-Ray-Train works the same way;
    # waiting for the Train workers here would cost another 1-2 minutes of start-up on a loaded 2-core machine.)
    cfg = tiny_cfg(tmp_path, "train.max_steps=100000", "train.eval_every=100000", "output.name=long")
    sid = jobs.submit_job(cfg, "train", head["url"], token=head["token"])
    deadline = time.monotonic() + 120
    while "Running entrypoint" not in (logs := jobs.job_logs(head["url"], sid, token=head["token"])):
        assert time.monotonic() < deadline, logs[-2000:]
        time.sleep(0.5)
    assert jobs.job_status(head["url"], sid, token=head["token"])["status"] == "RUNNING"
    time.sleep(2)  # the driver is importing torch / connecting to Ray
    # Execute
    status = jobs.stop_job(head["url"], sid, token=head["token"], timeout_s=60)
    # Assert
    assert status == "STOPPED"
    assert jobs.wait_for_job(head["url"], sid, follow_logs=False, err=io.StringIO(), token=head["token"]) == 130
    assert jobs.stop_job(head["url"], sid, token=head["token"]) == "STOPPED"  # already over: left alone
    assert jobs.job_status(head["url"], sid, token=head["token"])["end_time"] is not None
    assert not (tmp_path / "registry").exists()
