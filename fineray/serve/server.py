"""`fineray serve`: start Ray Serve on this machine (or a cluster) with the OpenAI application.

Without API keys the server binds 127.0.0.1 whatever `host` says (and logs so); `insecure_no_auth: true`
lifts that for deployments behind an authenticating gateway. Shutdown (Ctrl-C / SIGTERM) deletes the
application, which drains in-flight requests for up to `graceful_shutdown_timeout_s`, then stops Serve and
the private Ray instance this process started.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Self

from fineray.serve.config import ServeConfig

__all__ = ["ServerHandle", "bind_host", "run_server"]

log = logging.getLogger(__name__)


def bind_host(cfg: ServeConfig, keys_enabled: bool) -> tuple[str, str | None]:
    """The address to bind and a warning to show (None when there is nothing to say)."""
    loopback = cfg.host in ("127.0.0.1", "localhost", "::1")
    if keys_enabled or loopback:
        return cfg.host, None
    if cfg.insecure_no_auth:
        return cfg.host, (f"serving WITHOUT API keys on {cfg.host} (insecure_no_auth: true): anyone who can reach "
                          "the port can use every model")
    return "127.0.0.1", (f"no API keys configured: binding 127.0.0.1 only (not {cfg.host}). Set api_keys_file, "
                         f"keys or ${cfg.api_keys_env} to listen on other interfaces")


@dataclass
class ServerHandle:
    """A running server (from `run_server(..., blocking=False)`); also a context manager."""

    url: str
    host: str
    port: int
    started_ray: bool
    notes: list[str] = field(default_factory=list)
    _stopped: bool = False

    def shutdown(self) -> None:
        """Delete the application (draining requests), stop Serve, and stop Ray if we started it."""
        if self._stopped:
            return
        self._stopped = True
        from ray import serve

        from fineray.base.connect import shutdown_ray

        try:
            _flush_request_log()
            serve.shutdown()
        finally:
            if self.started_ray:
                shutdown_ray()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def run_server(cfg: ServeConfig, *, blocking: bool = True, ready_timeout_s: float = 600) -> ServerHandle:
    """Deploy the OpenAI-compatible app on Ray Serve.

    Args:
        cfg: the serve config (`load_serve_config`).
        blocking: wait until SIGINT/SIGTERM, then shut down gracefully; with False return at once.
        ready_timeout_s: how long the application may take to become healthy.

    Returns:
        A `ServerHandle` (already shut down when `blocking`).

    Raises:
        ConfigError: invalid API keys; RuntimeError: the application failed to start.
    """
    from ray import serve

    from fineray.base.connect import init_ray
    from fineray.serve.app import APP_NAME, build_application
    from fineray.serve.auth import KeyStore

    keys = KeyStore(cfg)  # validates key files before anything starts
    host, warning = bind_host(cfg, keys.enabled)
    if warning:
        log.warning(warning)
    started = init_ray(cfg.ray.address, cfg.ray.num_cpus)
    handle = ServerHandle(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{cfg.port}", host,
                          cfg.port, started, [warning] if warning else [])
    try:
        serve.start(http_options={"host": host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
        serve.run(build_application(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        _wait_ready(APP_NAME, ready_timeout_s)
    except BaseException:
        handle.shutdown()
        raise
    log.info("fineray serving %s (base %s, registry %s) on %s", APP_NAME, cfg.base, cfg.registry, handle.url)
    if not blocking:
        return handle
    for note in handle.notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    print(f"fineray serve: {handle.url}/v1 (base {cfg.base}, registry {cfg.registry}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        log.info("shutting down (draining for up to %.0f s)", cfg.graceful_shutdown_timeout_s)
        handle.shutdown()
    return handle


def _flush_request_log() -> None:
    """Write the request log's pending rows before Serve stops (`log_requests` only; best effort)."""
    from ray import serve

    from fineray.serve.app import APP_NAME

    try:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and "RequestLog" in app.deployments:
            serve.get_deployment_handle("RequestLog", APP_NAME).flush.remote().result(timeout_s=30)
    except Exception:
        log.warning("could not flush the request log", exc_info=True)


def _wait_ready(app: str, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise RuntimeError(f"the serve application failed to start: {status.message}")
        time.sleep(0.25)
    raise RuntimeError(f"the serve application was not ready after {timeout_s:.0f} s")
