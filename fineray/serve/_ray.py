"""Starting Ray for `fineray serve` / `fineray generate`: join a cluster, or a private local instance.

A private instance runs without the dashboard (it costs seconds of start-up and a CPU-hungry process,
and neither Serve nor Ray Data needs it), and is retried once when its raylet misses Ray's fixed 30 s
registration window, which happens on an overloaded machine.
"""

from __future__ import annotations

import logging
import os

__all__ = ["init_ray"]

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray unless it already is; returns whether this call started it (so it should stop it).

    Args:
        address: `auto`, `host:6379` or `ray://host:10001` joins a cluster; empty uses `RAY_ADDRESS` when set
            (inside a Ray job), else starts a private local Ray (never joining another one on the machine).
        num_cpus: CPUs of a private local Ray (default: all cores).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
            return True
        except Exception as e:  # Ray raises a bare Exception for a raylet that did not register in time
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("Ray did not start in time; retrying once")
            ray.shutdown()
    return True
