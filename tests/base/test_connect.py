"""fineray.base.connect: a failed start's processes are ended; a private cluster pins its address, so a fineray
run works with a second Ray instance on the machine (Ray Train's placement-group cleaner would otherwise fail
with "Found multiple active Ray instances")."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_head import start_head, stop_head


def test_half_started_ray_processes_are_ended_by_their_gcs_port() -> None:
    """A failed ray.init leaves its GCS/dashboard running; the retry ends exactly those children."""
    from fineray.base.connect import _kill_half_started

    # Prepare: two children, one naming the failed cluster's GCS port
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--gcs-address=10.0.0.1:54321"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--gcs-address=10.0.0.1:5432"])
    try:
        # Execute
        _kill_half_started(54321)
        # Assert
        assert ours.wait(timeout=10) != 0
        assert other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


@pytest.mark.integration
def test_training_beside_a_second_ray_instance(tmp_path: Path) -> None:
    """A tiny 2-worker `fineray train` (its own private cluster) while another Ray head runs on the machine."""
    # Prepare: a second Ray on other ports (stopped by PID at the end), and a clean environment for the run
    proc, temp, _ = start_head(token=secrets.token_hex(16), num_cpus=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    summary = tmp_path / "summary.json"
    try:
        # Execute
        out = subprocess.run(
            [sys.executable, "-m", "fineray.cli", "train", "--no-eval", "--no-progress", "--no-data-checks",
             "--json", str(summary), "model.base=tiny:llama", "scaling.num_workers=2", "cluster.num_cpus=2",
             "train.max_steps=2", "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1",
             "train.threads_per_worker=1", "data.max_examples=16", f"output.dir={tmp_path}/runs",
             f"output.registry={tmp_path}/adapters", "output.name=beside"],
            env=env, capture_output=True, text=True, timeout=400)
    finally:
        stop_head(proc, temp)
    # Assert: the run finished, and nothing in it tripped over the other instance
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    assert "multiple active Ray instances" not in logs
    assert json.loads(summary.read_text())["steps"] == 2
    assert (tmp_path / "runs" / "beside" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_a_private_cluster_pins_its_address_while_it_is_up() -> None:
    """Every process of the job and the driver itself name the private cluster; stopping it unpins."""
    import ray

    from fineray.base.connect import init_ray, shutdown_ray

    # Prepare: this test needs to start the cluster itself
    if ray.is_initialized():
        ray.shutdown()
    before = os.environ.get("RAY_ADDRESS")
    os.environ.pop("RAY_ADDRESS", None)
    try:
        # Execute
        assert init_ray(None, 1)
        gcs = ray.get_runtime_context().gcs_address
        driver = os.environ.get("RAY_ADDRESS")
        worker = ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).remote())
        shutdown_ray()
        # Assert
        assert driver == gcs and worker == gcs
        assert "RAY_ADDRESS" not in os.environ
    finally:
        if ray.is_initialized():
            shutdown_ray()
        if before is not None:
            os.environ["RAY_ADDRESS"] = before
