"""The coordinator's HTTPS endpoints: a Starlette app served by uvicorn over TLS 1.2+ (optionally mutual TLS).

Endpoints (``<r>`` = round number)::

    GET  /v1/health              liveness (no auth)
    GET  /v1/config              the shared run settings (model, LoRA, local training)
    GET  /v1/task                what this silo should do now: evaluate | train | share | mask | unmask | wait | done
    GET  /v1/adapter             global adapter (safetensors; at this silo's rank)
    GET  /v1/residual            folded base residual (safetensors; 404 if none)
    POST /v1/rounds/<r>/update   plain update (safetensors + metadata); 422 if rejected
    POST /v1/rounds/<r>/decline  {"reason"}: the silo's own check failed (secure aggregation)
    POST /v1/rounds/<r>/keys     {"keys": {enc_pk, mask_pk, seed_hash}, "num_examples", "metrics"}
    POST /v1/rounds/<r>/shares   {recipient id: hex ciphertext}: encrypted key shares, relayed unread
    POST /v1/rounds/<r>/masked   masked vector (safetensors, uint32/uint64)
    POST /v1/rounds/<r>/reveal   {"seeds", "mask_keys"}: a survivor's shares for unmasking
    POST /v1/eval                {"version", "loss", "tokens", "error"}

Bodies are JSON or raw safetensors bytes, never pickle. Every refusal is JSON ``{"error": message}`` with its
code: 400 malformed body, 401 unknown silo or wrong token, 403 certificate of another silo or not a silo of
this federation, 404 no such route or resource, 405 wrong method, 409 not the open round or phase, 413 body
over the limit; a rejected update is 422 ``{"status": "rejected: ..."}``.

Which client certificate a request came with: uvicorn 0.55 does not fill the ASGI TLS extension, so
:class:`_TLSInfoProtocol` (its h11 protocol plus a few lines) reads the peer certificate once per connection
from the transport's ``ssl_object`` and adds ``scope["extensions"]["tls"]["client_cert_chain"]`` (PEM, as in
the ASGI spec) to every request on that connection.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fineray.federated.wire import MAX_BODY_BYTES, SubmitError

if TYPE_CHECKING:
    from fineray.federated.server import Coordinator

__all__ = ["check_tls_files", "make_app", "serve_https"]


class _TLSInfoProtocol(H11Protocol):
    """uvicorn's h11 protocol that puts the connection's client certificate into each request's scope."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [], "client_cert_error": None}
        app = self.app

        async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = tls
            await app(scope, receive, send)

        self.app = with_tls


@functools.lru_cache(maxsize=256)
def _common_name(pem: str) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = x509.load_pem_x509_certificate(pem.encode()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _client_cn(request: Request) -> str | None:
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    return _common_name(chain[0]) if chain else None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
    return _error(exc.status_code, detail)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes, by its declared length or while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise SubmitError(413, f"body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise SubmitError(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, limit: int) -> dict[str, Any]:
    try:
        out = json.loads(await _body(request, limit) or b"{}")
    except json.JSONDecodeError as e:
        raise SubmitError(400, f"invalid JSON: {e}") from None
    if not isinstance(out, dict):
        raise SubmitError(400, "expected a JSON object")
    return out


def make_app(coord: Coordinator, tokens: dict[str, str] | None, mtls: bool,
             max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The coordinator's Starlette app.

    Args:
        coord: The coordinator (its :class:`~fineray.federated.federation.Federation` does the work).
        tokens: ``{silo: token}`` for bearer authentication, or None.
        mtls: Client certificates are required; their common name must be the silo's name.
        max_body_bytes: Largest accepted request body.
    """
    from fineray.federated.server import shared_settings

    fed, settings = coord.fed, shared_settings(coord.cfg)

    def authenticate(request: Request) -> str:
        name = request.headers.get("x-fineray-silo", "")
        if mtls:
            cn = _client_cn(request)
            name = name or cn or ""
            if cn != name:
                raise SubmitError(403, f"client certificate is for {cn!r}, not silo {name!r}")
        if tokens is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else ""
            expected = tokens.get(name)
            if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
                raise SubmitError(401, "unknown silo or wrong token")
        if name not in fed.silo_ids:
            raise SubmitError(403, f"{name!r} is not a silo of this federation")
        fed.last_seen[name] = time.monotonic()  # any authenticated request counts as "online"
        return name

    def endpoint(handler: Callable[[Request, str], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                return await handler(request, authenticate(request))
            except SubmitError as e:
                return _error(e.status, str(e))
            except (KeyError, ValueError, TypeError) as e:
                return _error(400, f"bad request: {type(e).__name__}: {e}")

        return run

    def blob(data: bytes, sha: str) -> Response:
        return Response(data, media_type="application/octet-stream", headers={"X-Fineray-Sha256": sha})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def config(request: Request, silo: str) -> Response:
        return JSONResponse({"settings": settings, "silo": silo, "rounds": coord.fcfg.rounds})

    async def task(request: Request, silo: str) -> Response:
        return JSONResponse(await run_in_threadpool(coord.status_for, silo))

    async def adapter(request: Request, silo: str) -> Response:
        data, sha, _ = await run_in_threadpool(fed.adapter_blob, silo)
        return blob(data, sha)

    async def residual(request: Request, silo: str) -> Response:
        res = await run_in_threadpool(fed.residual_blob)
        if res is None:
            raise SubmitError(404, "no residual")
        return blob(*res)

    async def round_post(request: Request, silo: str) -> Response:
        rno, kind = int(request.path_params["round"]), request.path_params["kind"]
        if kind in ("update", "masked"):
            data = await _body(request, max_body_bytes)
            submit = fed.submit_update if kind == "update" else fed.submit_masked
            status = await run_in_threadpool(submit, silo, rno, data)
            return JSONResponse({"status": status}, status_code=422 if status.startswith("rejected") else 200)
        body = await _json(request, max_body_bytes)
        if kind == "decline":
            call = functools.partial(fed.submit_decline, silo, rno, str(body.get("reason")))
        elif kind == "keys":
            call = functools.partial(fed.submit_key, silo, rno, body["keys"], int(body["num_examples"]),
                                     body.get("metrics"))
        elif kind in ("shares", "reveal"):
            call = functools.partial(fed.submit_shares if kind == "shares" else fed.submit_reveal, silo, rno, body)
        else:
            raise SubmitError(404, f"no route POST {request.url.path}")
        return JSONResponse({"status": await run_in_threadpool(call)})

    async def evaluation(request: Request, silo: str) -> Response:
        body = await _json(request, max_body_bytes)
        loss = body.get("loss")
        await run_in_threadpool(fed.record_eval, int(body["version"]), silo,
                                float(loss) if loss is not None else None, int(body.get("tokens") or 0),
                                body.get("error"))
        return JSONResponse({"status": "recorded"})

    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/config", endpoint(config), methods=["GET"]),
        Route("/v1/task", endpoint(task), methods=["GET"]),
        Route("/v1/adapter", endpoint(adapter), methods=["GET"]),
        Route("/v1/residual", endpoint(residual), methods=["GET"]),
        Route("/v1/rounds/{round:int}/{kind}", endpoint(round_post), methods=["POST"]),
        Route("/v1/eval", endpoint(evaluation), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def check_tls_files(certfile: str, keyfile: str, ca_file: str | None) -> None:
    """Loads the server certificate, its key and the silos' CA once, so that a bad file fails before anything runs.

    Raises:
        ConfigError: A file is missing, unreadable, or the key does not match the certificate.
    """
    from fineray.train.config import ConfigError

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile)
        if ca_file:
            ctx.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as e:  # FileNotFoundError, PEM errors, key/certificate mismatch
        raise ConfigError(f"cannot load the coordinator's TLS files (cert {certfile}, key {keyfile}, CA "
                          f"{ca_file}): {e}") from None


@contextlib.contextmanager
def serve_https(app: Any, host: str, port: int, certfile: str, keyfile: str, ca_file: str | None) -> Iterator[str]:
    """Serves ``app`` with uvicorn in a background thread; yields the base URL (``port`` 0 picks a free one).

    With ``ca_file`` clients must present a certificate chaining to it (else the TLS handshake fails).

    Raises:
        OSError: The address is taken (or the certificate files are unreadable: see :func:`check_tls_files`).
        RuntimeError: The server thread stopped while starting (uvicorn logs why).
    """
    import uvicorn

    # log_config=None: no dictConfig of the process's logging; uvicorn's warnings reach the root handlers.
    config = uvicorn.Config(app, http=_TLSInfoProtocol, loop="asyncio", lifespan="off", log_config=None,
                            log_level="warning", access_log=False, timeout_keep_alive=30, ssl_certfile=certfile,
                            ssl_keyfile=keyfile, ssl_ca_certs=ca_file,
                            ssl_cert_reqs=ssl.CERT_REQUIRED if ca_file else ssl.CERT_NONE)
    config.load()  # builds the TLS context here, so a bad certificate fails in the caller's thread
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="fineray-coordinator-https")
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the coordinator's HTTPS server did not start (see the log)")
        time.sleep(0.02)
    bound = sock.getsockname()[1]
    shown = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    try:
        yield f"https://{f'[{shown}]' if ':' in shown else shown}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
