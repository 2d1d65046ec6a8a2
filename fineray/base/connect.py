"""Connecting to Ray: a private local cluster on a laptop, or an existing cluster by address.

A private cluster is pinned by address: Ray's State API (used inside the cluster, e.g. by Ray Train's
placement-group cleaner and by Tune's trial bookkeeping) finds "the" cluster by scanning the machine for GCS
processes and fails with "Found multiple active Ray instances" when another Ray runs there. So the private
cluster's GCS gets a fixed port chosen before it starts, every process of the job gets `RAY_ADDRESS` (runtime
env), and the driver's own `RAY_ADDRESS` names it while it is up (`shutdown_ray` puts the old value back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

__all__ = ["init_ray", "ray_cluster", "shutdown_ray"]

log = logging.getLogger(__name__)

# The address this process pinned in os.environ["RAY_ADDRESS"] and what was there before (None: unset).
_pinned: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _kill_half_started(port: int) -> None:
    """A failed `ray.init` leaves the processes it started (GCS, dashboard, ...) running: end those of this
    process's children that belong to that cluster (they name its GCS port)."""
    try:
        import psutil
    except ImportError:  # not a declared dependency: without it they end with this process (fate-sharing)
        return
    for child in psutil.Process().children(recursive=True):
        try:
            if any(a.endswith((f":{port}", f"={port}")) for a in child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


def _start_private(num_cpus: int | None, resources: dict[str, float] | None, dashboard: bool,
                   runtime_env: dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
    """Start a private local cluster on a fixed GCS port; return its GCS address."""
    import ray

    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    renv = dict(runtime_env or {})
    # RAY_ADDRESS pins this cluster for every process it starts. One machine has no node to be preempted:
    # Ray Train's preemption watcher would be one more actor process per fit (~3 s of CPU each to start).
    renv["env_vars"] = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **(renv.get("env_vars") or {}),
                        "RAY_ADDRESS": address}
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=dashboard,
                 runtime_env=renv, **kwargs)
    except Exception:
        ray.shutdown()
        _kill_half_started(port)
        raise
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    return address


def _pin(address: str) -> None:
    _pinned.setdefault("previous", os.environ.get("RAY_ADDRESS"))
    _pinned["address"] = address
    os.environ["RAY_ADDRESS"] = address


def _unpin() -> None:
    if "address" not in _pinned:
        return
    if os.environ.get("RAY_ADDRESS") == _pinned["address"]:
        previous = _pinned.get("previous")
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
    _pinned.clear()


def _configured_address(address: str | None) -> str | None:
    """`address`, else `RAY_ADDRESS` unless it is the address of a private cluster this process pinned."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS") or None
    if env is not None and env == _pinned.get("address"):
        _unpin()  # the pinned cluster is gone (someone called ray.shutdown() directly)
        return os.environ.get("RAY_ADDRESS") or None
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False,
             resources: dict[str, float] | None = None, runtime_env: dict[str, Any] | None = None,
             quiet: bool = True, log_to_driver: bool = True) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it (so it should stop it).

    Args:
        address: empty/None starts a private local Ray (`address="local"`, never joining another cluster on
            the machine); `auto` or `ray://host:10001` / `host:6379` joins an existing cluster. Inside a
            Ray job (`RAY_ADDRESS` set by the job runner) the job's cluster is used.
        num_cpus: CPUs of a private local cluster (default: all cores).
        dashboard: start the dashboard with a private cluster (seconds of start-up and a CPU-hungry
            process; Ray Train's progress pages and Tune's trial cleanup want it, Serve and Ray Data do not).
        resources: custom resources of a private cluster (e.g. the federated silos' `silo:<name>`).
        runtime_env: the job's runtime env (a private cluster adds `RAY_ADDRESS` to its `env_vars`).
        quiet: Ray's own logging at WARNING.
        log_to_driver: forward the workers' stdout/stderr to this process.

    A private cluster is retried once when its raylet misses Ray's fixed 30 s registration window, which
    happens on an overloaded machine; the processes of the failed attempt are ended first. Stop a cluster
    this call started with `shutdown_ray` (which also unpins its address).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    address = _configured_address(address)
    if address:
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
        return True
    for attempt in (1, 2):
        try:
            _pin(_start_private(num_cpus, resources, dashboard, runtime_env, kwargs))
            return True
        except Exception as e:  # Ray raises a bare Exception for a raylet that did not register in time
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("Ray did not start in time; retrying once")
    return True


def shutdown_ray() -> None:
    """Stop this process's Ray connection (and the private cluster it started); unpin its address."""
    import ray

    try:
        ray.shutdown()
    finally:
        _unpin()


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = True,
                resources: dict[str, float] | None = None, runtime_env: dict[str, Any] | None = None,
                quiet: bool = True, log_to_driver: bool = True) -> Iterator[bool]:
    """Run the body with Ray initialised (`init_ray`; the dashboard on by default); yields whether this call
    started Ray, and shuts down only what it started."""
    import ray

    if not ray.is_initialized():
        # Ray Train V2's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
        # each report waits for that poll; 0.5 s cuts the per-report stall with no measurable polling cost.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = init_ray(address, num_cpus, dashboard=dashboard, resources=resources, runtime_env=runtime_env,
                       quiet=quiet, log_to_driver=log_to_driver)
    try:
        yield started
    finally:
        if started:
            shutdown_ray()
