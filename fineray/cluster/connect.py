"""Connecting to Ray: a private local cluster on a laptop, or an existing cluster by address."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["init_ray", "ray_cluster"]

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False,
             resources: dict[str, float] | None = None, runtime_env: dict[str, Any] | None = None,
             quiet: bool = True) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it (so it should stop it).

    Args:
        address: empty/None starts a private local Ray (`address="local"`, never joining another cluster on
            the machine); `auto` or `ray://host:10001` / `host:6379` joins an existing cluster. Inside a
            Ray job (`RAY_ADDRESS` set by the job runner) the job's cluster is used.
        num_cpus: CPUs of a private local cluster (default: all cores).
        dashboard: start the dashboard with a private cluster (seconds of start-up and a CPU-hungry
            process; Ray Train's progress pages want it, Serve and Ray Data do not).
        resources: custom resources of a private cluster (e.g. the federated silos' `silo:<name>`).

    A private cluster is retried once when its raylet misses Ray's fixed 30 s registration window, which
    happens on an overloaded machine.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
        return True
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=dashboard,
                     **kwargs)
            return True
        except Exception as e:  # Ray raises a bare Exception for a raylet that did not register in time
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("Ray did not start in time; retrying once")
            ray.shutdown()
    return True


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None,
                runtime_env: dict[str, Any] | None = None, quiet: bool = True) -> Iterator[None]:
    """Run the body with Ray initialised (`init_ray`, with the dashboard); shut down only what this call
    started."""
    import ray

    if not ray.is_initialized():
        # Ray Train V2's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
        # each report waits for that poll; 0.5 s cuts the per-report stall with no measurable polling cost.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = init_ray(address, num_cpus, dashboard=True, runtime_env=runtime_env, quiet=quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
