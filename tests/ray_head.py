"""A second Ray on this machine for tests: `ray start --head --block` in a private temp dir on free ports (token
token auth on), stopped by PID (never `ray stop`, which would end other agents' clusters)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fineray.cluster import _auth

VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _marked_pids(marker: str) -> list[int]:
    """PIDs of processes whose environment carries our marker (only this fixture's Ray processes)."""
    needle = f"FINERAY_TEST_HEAD={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Stop one private head: its `ray start --block` process group, then any process carrying its marker."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for pid in _marked_pids(temp):  # by PID: only processes started by this head
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not os.environ.get("FINERAY_TEST_KEEP_RAY"):  # set it to keep the head's logs for a post-mortem
        shutil.rmtree(temp, ignore_errors=True)


def start_head(*, token: str, num_cpus: int = 2) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` in a private temp dir on free ports, with token auth on; wait for the Jobs API."""
    temp = tempfile.mkdtemp(prefix="frj-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, nm, om, client, agent, agent_grpc, renv, metrics = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, FINERAY_TEST_HEAD=temp, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp}", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", f"--num-cpus={num_cpus}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
           "--object-store-memory=200000000", "--disable-usage-stats"]
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        # `ray start` prints this once the raylet registered (it gives up after 30 s on an overloaded machine)
        if "Ray runtime started" in log_path.read_text():
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/jobs/", headers=_auth.auth_headers(token), timeout=2).status_code == 200:
                    return proc, temp, url
        time.sleep(0.5)
    text = log_path.read_text()
    stop_head(proc, temp)
    raise RuntimeError(f"private Ray head did not start:\n{text[-3000:]}")
