"""Reaching a Ray cluster's Jobs API: the dashboard address, the auth token, a checked `JobSubmissionClient`.

Ray 2.60 turns token authentication on by default: the dashboard answers 401 without an
`Authorization: Bearer <token>` header and 403 with a wrong one. Ray's own SDK only sends a token when the
*client* process runs with `RAY_AUTH_MODE=token`, so fineray sends it itself whenever it finds one (explicit
argument, `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`); a cluster without auth ignores it.

Before Ray's client is built the dashboard is probed with a short timeout, because Ray's client uses `requests`
without one (a firewalled address would hang for minutes) and its errors do not say what to do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "JobError",
    "auth_headers",
    "connect",
    "is_local_address",
    "probe_dashboard",
    "raise_for_auth",
    "resolve_address",
    "resolve_token",
    "translate_error",
]

DEFAULT_DASHBOARD_PORT = 8265
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Ray's JobSubmissionClient lets these override an explicit address; fineray gives the explicit one priority.
_ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

_CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                   "ray._private.runtime_env.packaging")
_TOKEN_HELP = ("pass --token, set RAY_AUTH_TOKEN, or save the cluster's token in ~/.ray/auth_token "
               "(print it with `ray get-auth-token` on the head node; on KubeRay it is in the cluster's auth Secret)")


class JobError(RuntimeError):
    """A user-facing Ray Jobs problem (unreachable dashboard, rejected token, unknown job, bad submission)."""


def resolve_address(address: str | None) -> str:
    """The dashboard URL (`http(s)://host:port`) to submit to.

    Args:
        address: `http://host:8265`, `https://...`, `host[:port]` (http assumed, port 8265 by default), or
            `ray://host:10001` (Ray Client address; the dashboard is assumed on port 8265 of the same host).
            Empty: `RAY_API_SERVER_ADDRESS`, then `RAY_ADDRESS` (when that is an http(s):// or ray:// URL).

    Raises:
        JobError: no address anywhere, or one that is not a URL of a dashboard (e.g. `auto`, `host:6379`).
    """
    source = "--address"
    if not address:
        for env in _ADDRESS_ENVS:
            if os.environ.get(env):
                address, source = os.environ[env], env
                break
    if not address:
        raise JobError("no Ray cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS "
                       "to the dashboard URL")
    address = raw = address.strip().rstrip("/")
    if address in ("auto", "local"):
        raise JobError(f"{source}={address!r} is not a dashboard URL: pass http://<head>:8265 (for a head on "
                       f"this machine: http://127.0.0.1:8265)")
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    scheme = parts.scheme.lower()
    if scheme == "ray":  # Ray Client port -> the dashboard on its default port, same host
        scheme, port = "http", DEFAULT_DASHBOARD_PORT
    elif scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError:
            raise JobError(f"{source}={raw!r}: bad port") from None
        if port is None:  # a bare http host is a head's dashboard; https without a port is an ingress
            port = 443 if scheme == "https" else DEFAULT_DASHBOARD_PORT
    else:
        raise JobError(f"{source}={raw!r}: use an http(s):// dashboard URL, e.g. http://<head>:8265")
    if not parts.hostname:
        raise JobError(f"{source}={raw!r}: no host name")
    if port == 6379:
        raise JobError(f"{source}={raw!r} is the GCS port; the Jobs API is served by the dashboard "
                       f"(default port {DEFAULT_DASHBOARD_PORT})")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def is_local_address(url: str) -> bool:
    """True when the dashboard URL points at this machine (loopback or this host's own name/address)."""
    host = urlsplit(url).hostname or ""
    if host in ("localhost", "0.0.0.0", "::"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback or host in _own_ips()
    if host.lower() in (socket.gethostname().lower(), socket.getfqdn().lower()):
        return True
    try:  # a name resolving to loopback (e.g. an /etc/hosts alias); DNS answers quickly or fails quickly
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _own_ips() -> set[str]:
    ips: set[str] = set()
    with contextlib.suppress(OSError):
        ips.update(i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None))
    return ips


def resolve_token(token: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from): the argument, `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`."""
    if token:
        return token.strip(), "--token"
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    candidates = []
    if os.environ.get(TOKEN_PATH_ENV):
        candidates.append((Path(os.environ[TOKEN_PATH_ENV]).expanduser(), TOKEN_PATH_ENV))
    candidates.append((Path.home() / ".ray" / "auth_token", "~/.ray/auth_token"))
    for path, label in candidates:
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text, f"{label} ({path})"
    return None, "no token"


def auth_headers(token: str | None) -> dict[str, str]:
    """The `Authorization` header for a token (empty without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def probe_dashboard(url: str, token: str | None, token_source: str = "--token", timeout_s: float = 10.0) -> str:
    """Check that `url` is a reachable Ray dashboard that accepts the token; return the cluster's Ray version.

    Raises:
        JobError: unreachable ("cannot reach the Ray dashboard at ..."), a rejected token ("the Ray cluster
            rejected the auth token (401/403) ..."), or something that is not a Ray dashboard.
    """
    import httpx

    try:
        r = httpx.get(f"{url}/api/version", headers=auth_headers(token), timeout=timeout_s)
    except httpx.TimeoutException as e:
        raise JobError(f"cannot reach the Ray dashboard at {url}: no answer within {timeout_s:.0f} s "
                       f"({type(e).__name__}); check the address, the port (default {DEFAULT_DASHBOARD_PORT}) "
                       "and firewalls, or port-forward it (kubectl port-forward svc/<cluster>-head-svc 8265)") from None
    except httpx.HTTPError as e:
        raise JobError(f"cannot reach the Ray dashboard at {url}: {e or type(e).__name__}; check the address and "
                       f"port (default {DEFAULT_DASHBOARD_PORT}), and start the head with --dashboard-host=0.0.0.0 "
                       "to reach it from other machines") from None
    raise_for_auth(r.status_code, url, token, token_source, r.text)
    try:
        version = r.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise JobError(f"{url} answered HTTP {r.status_code} on /api/version but is not a Ray dashboard; pass the "
                       f"dashboard address (http://<head>:{DEFAULT_DASHBOARD_PORT}), not the GCS or Ray Client "
                       "port") from None
    return str(version)


def raise_for_auth(status: int, url: str, token: str | None, token_source: str, body: str = "") -> None:
    """Turn a 401/403 answer into the rejected-token JobError."""
    if status == 401:
        raise JobError(f"the Ray cluster rejected the auth token (401: no token was sent) at {url}: the cluster "
                       f"has token authentication on; {_TOKEN_HELP}")
    if status == 403:
        raise JobError(f"the Ray cluster rejected the auth token (403: invalid token, from {token_source}) at {url}: "
                       f"{_TOKEN_HELP}")


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENVS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None, token: str | None = None, *, timeout_s: float = 10.0) -> Any:
    """A `ray.job_submission.JobSubmissionClient` for the dashboard at `address`, after a quick probe.

    The client carries the token header, and `address` wins over `RAY_ADDRESS` (Ray's client would let the
    environment override it).
    """
    url = resolve_address(address)
    tok, source = resolve_token(token)
    probe_dashboard(url, tok, source, timeout_s=timeout_s)
    from ray.job_submission import JobSubmissionClient

    for name in _CHATTY_LOGGERS:  # "Uploading package ...", "WebSocket closed ..." at INFO (set on import)
        logging.getLogger(name).setLevel(logging.WARNING)

    with _without_address_env():
        try:
            client = JobSubmissionClient(url, headers=auth_headers(tok))
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError/RuntimeError/AuthenticationError
            raise translate_error(e, url, tok, source) from None
    client._fineray_token = (tok, source)  # for error messages of later calls
    return client


def translate_error(e: BaseException, url: str, token: str | None, source: str) -> JobError:
    """A JobError for an exception raised by Ray's job client."""
    if isinstance(e, JobError):
        return e
    text = str(e)
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - ray always has it in 2.60
        AuthenticationError = ()
    if isinstance(e, AuthenticationError) or text.startswith("Authentication"):
        try:
            raise_for_auth(403 if token else 401, url, token, source)
        except JobError as err:
            return err
    if isinstance(e, ConnectionError) or "Failed to connect" in text:
        return JobError(f"cannot reach the Ray dashboard at {url}: {text}")
    return JobError(f"Ray Jobs API at {url}: {text}")
