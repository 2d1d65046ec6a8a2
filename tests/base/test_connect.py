"""fineray.base.connect: a failed start's processes are ended; a private cluster pins its address, so a fineray
run works with a second Ray instance on the machine (Ray Train's placement-group cleaner would otherwise fail
with "Found multiple active Ray instances"; tests/cli/test_cli.py trains beside a second instance)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
def test_a_private_cluster_pins_its_address_while_it_is_up() -> None:
    """Every process of the job and the driver itself name the private cluster; stopping it unpins."""
    import ray

    from fineray.base.connect import init_ray, shutdown_ray

    # Prepare: this test needs to start the cluster itself (a shared test Ray that is up comes back after)
    shared = ray.is_initialized()
    if shared:
        shutdown_ray()
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
        if shared:
            from tests.conftest import start_shared_ray

            start_shared_ray()
