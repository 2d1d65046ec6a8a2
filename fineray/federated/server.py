"""The networked coordinator: a :class:`Federation` behind HTTPS (standard library, no pickle).

Organisations never share a Ray cluster: each silo runs :func:`fineray.federated.client.run_silo` on its
own machine and polls this server. Bodies are JSON for control messages and raw safetensors bytes for
tensors. Every request except ``/v1/health`` is authenticated:

* per-silo bearer tokens (``Authorization: Bearer <token>`` + ``X-Fineray-Silo: <name>``), compared in
  constant time; unknown silo or wrong token -> 401;
* and/or mutual TLS (``ca_file``): the client certificate must chain to the CA (else the handshake
  fails) and its common name must be the silo's name (else 403).

Endpoints (``<r>`` = round, ``a`` = secure-aggregation attempt)::

    GET  /v1/health                 liveness (no auth)
    GET  /v1/config                 the shared run settings (model, LoRA, local training)
    GET  /v1/task                   what this silo should do now: evaluate | train | mask | wait | done
    GET  /v1/adapter                global adapter (safetensors; at this silo's rank)
    GET  /v1/residual               folded base residual (safetensors; 404 if none)
    POST /v1/rounds/<r>/update      plain update (safetensors + metadata); 422 if rejected
    POST /v1/rounds/<r>/decline     {"reason"}: the silo's own check failed (secure aggregation)
    POST /v1/rounds/<r>/key?attempt=a     {"public_key": hex, "num_examples", "metrics"}
    POST /v1/rounds/<r>/masked?attempt=a  masked vector (safetensors, uint64)
    POST /v1/eval                   {"version", "loss", "tokens", "error"}

Submissions are idempotent (a repeat answers ``duplicate``). A monitor thread opens rounds once
``min_silos`` silos are online, enforces deadlines (:meth:`Federation.tick`) and evaluates the global
held-out set; state is checkpointed every round, so restarting the coordinator on the same
``output.name`` resumes at the next round.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fineray.federated.config import FederatedConfig, federated_config
from fineray.federated.federation import Federation, SubmitError
from fineray.federated.outputs import check_run_config, federation_run_dir, finalize
from fineray.federated.report import FederationResult
from fineray.federated.silo import evaluate_adapter
from fineray.federated.wire import MAX_BODY_BYTES
from fineray.train.config import ConfigError, RunConfig

__all__ = ["Coordinator", "load_tokens", "run_coordinator", "shared_settings"]

log = logging.getLogger(__name__)


def load_tokens(path: str | Path) -> dict[str, str]:
    """Per-silo tokens from a JSON or YAML file ``{silo name: token}`` (keep it readable by the operator only).

    Raises:
        ConfigError: Missing file, or not a mapping of non-empty strings.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tokens file not found: {p}")
    data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise ConfigError(f"{p}: expected a mapping of silo name -> non-empty token string")
    return dict(data)


def shared_settings(cfg: RunConfig) -> dict[str, Any]:
    """The run settings every silo must share (model, LoRA, local optimisation, tokenisation)."""
    d = cfg.to_dict()
    data_keys = ("format", "max_seq_len", "packing", "train_on_prompt", "on_error", "max_examples", "system_prompt")
    train_keys = ("lr", "batch_size", "grad_accum", "warmup_ratio", "scheduler", "weight_decay", "grad_clip",
                  "precision", "grad_checkpointing", "seed", "max_failures")
    return {"model": {**d["model"], "adapter": None}, "method": d["method"], "lora": d["lora"],
            "data": {k: d["data"][k] for k in data_keys}, "train": {k: d["train"][k] for k in train_keys}}


class Coordinator:
    """Per-silo task dispatch and the monitor loop around a :class:`Federation` (transport-free)."""

    def __init__(self, cfg: RunConfig, fcfg: FederatedConfig, fed: Federation, run_dir: Path, *,
                 start_wait_s: float = 60.0, online_window_s: float = 30.0, progress: Callable[[str], None] | None = None):
        self.cfg, self.fcfg, self.fed, self.run_dir = cfg, fcfg, fed, run_dir
        self.start_wait_s, self.online_window_s = start_wait_s, online_window_s
        self.progress = progress or (lambda msg: None)
        self.started = time.monotonic()
        self.opened_any = False
        self.done = threading.Event()
        self._finished_at: float | None = None

    def status_for(self, silo: str) -> dict[str, Any]:
        """The silo's next action (JSON-able)."""
        fed = self.fed
        with fed._lock:
            fed.last_seen[silo] = time.monotonic()
            v = fed.round
            if self.done.is_set():
                return {"status": "done", "version": v}
            if not fed.has_eval(v, silo):
                return {"status": "evaluate", "version": v, "max_examples": self.fcfg.eval_max_examples}
            cur = fed.current
            if cur is not None and silo in cur.participants:
                if cur.phase == "train" and silo not in cur.responded:
                    return {"status": "train", **fed.train_task(silo)}
                if cur.phase == "mask" and silo in (cur.keyset or {}) and silo not in cur.masked:
                    return {"status": "mask", "round": cur.round, "attempt": cur.attempt,
                            "keyset": fed.keyset(cur.round, cur.attempt)}
            return {"status": "wait", "retry_after": 0.5}

    def step(self) -> None:
        """One monitor iteration: held-out evaluation, opening rounds, deadlines, finishing."""
        fed, f = self.fed, self.fcfg
        now = time.monotonic()
        if f.eval_data and not fed.has_eval(fed.round, "held_out"):
            blob, _, _ = fed.adapter_blob()
            res = fed.residual_blob()
            try:
                out = evaluate_adapter(self.cfg, blob, res[0] if res else None, f.eval_data, f.eval_max_examples,
                                       self.run_dir / "eval")
                fed.record_eval(fed.round, "held_out", out["loss"], out["tokens"])
            except Exception as e:  # noqa: BLE001 - reported, the federation goes on
                fed.record_eval(fed.round, "held_out", None, error=f"{type(e).__name__}: {e}"[:300])
        row = fed.tick()
        if row is not None:
            eps = f", epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
            self.progress(f"round {row['round']}/{f.rounds}: {row['status']}, {len(row['accepted'])}/"
                          f"{len(row['participants'])} accepted, rejected {sorted(row['rejected'])}, "
                          f"stragglers {row['stragglers']}{eps}")
        if fed.finished:
            if self._finished_at is None:
                self._finished_at = now
            evaluated = all(fed.has_eval(fed.round, s) for s in fed.silos if self._online(s, now))
            if evaluated or now - self._finished_at > f.final_eval_timeout_s:
                fed.save()
                self.done.set()
            return
        if fed.current is None:
            online = [s for s in fed.silos if self._online(s, now)]
            waiting_first = not self.opened_any and now - self.started < self.start_wait_s
            if waiting_first and len(online) < len(fed.silos):
                return
            if fed.open_round(online) is not None:
                self.opened_any = True
                fed.save()  # persists the evaluations of the version the round starts from
                self.progress(f"round {fed.current.round}/{f.rounds} open: {fed.current.participants}")

    def _online(self, silo: str, now: float) -> bool:
        seen = self.fed.last_seen.get(silo)
        return seen is not None and now - seen <= self.online_window_s


def _make_handler(coord: Coordinator, tokens: dict[str, str] | None, mtls: bool) -> type[BaseHTTPRequestHandler]:
    fed = coord.fed
    settings = shared_settings(coord.cfg)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120
        server_version = "fineray-federated"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, body: bytes | dict[str, Any], ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype if not isinstance(body, dict) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY_BYTES:
                raise SubmitError(413, f"body of {n} bytes exceeds {MAX_BODY_BYTES}")
            return self.rfile.read(n) if n else b""

        def _json(self) -> dict[str, Any]:
            try:
                out = json.loads(self._body() or b"{}")
            except json.JSONDecodeError as e:
                raise SubmitError(400, f"invalid JSON: {e}") from None
            if not isinstance(out, dict):
                raise SubmitError(400, "expected a JSON object")
            return out

        def _auth(self) -> str:
            name = self.headers.get("X-Fineray-Silo", "")
            if mtls:
                cert = self.connection.getpeercert() or {}
                cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
                name = name or (cn or "")
                if cn != name:
                    raise SubmitError(403, f"client certificate is for {cn!r}, not silo {name!r}")
            if tokens is not None:
                auth = self.headers.get("Authorization", "")
                given = auth[7:] if auth.startswith("Bearer ") else ""
                expected = tokens.get(name)
                if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
                    raise SubmitError(401, "unknown silo or wrong token")
            if name not in fed.silo_ids:
                raise SubmitError(403, f"{name!r} is not a silo of this federation")
            fed.last_seen[name] = time.monotonic()  # any authenticated request counts as "online"
            return name

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path.rstrip("/")
            try:
                if method == "GET" and path == "/v1/health":
                    return self._send(200, {"ok": True})
                silo = self._auth()
                if method == "GET":
                    return self._get(silo, path)
                m = re.fullmatch(r"/v1/rounds/(\d+)/(update|decline|key|masked)", path)
                if m:
                    return self._post_round(silo, int(m.group(1)), m.group(2), int(query.get("attempt", 0)))
                if path == "/v1/eval":
                    body = self._json()
                    loss = body.get("loss")
                    fed.record_eval(int(body["version"]), silo, float(loss) if loss is not None else None,
                                    int(body.get("tokens") or 0), body.get("error"))
                    return self._send(200, {"status": "recorded"})
                raise SubmitError(404, f"no route {method} {path}")
            except SubmitError as e:
                self._send(e.status, {"error": str(e)})
            except (KeyError, ValueError, TypeError) as e:
                self._send(400, {"error": f"bad request: {type(e).__name__}: {e}"})

        def _get(self, silo: str, path: str) -> None:
            if path == "/v1/config":
                return self._send(200, {"settings": settings, "silo": silo, "rounds": coord.fcfg.rounds})
            if path == "/v1/task":
                return self._send(200, coord.status_for(silo))
            if path == "/v1/adapter":
                blob, sha, _ = fed.adapter_blob(silo)
                return self._send(200, blob, "application/octet-stream", {"X-Fineray-Sha256": sha})
            if path == "/v1/residual":
                res = fed.residual_blob()
                if res is None:
                    raise SubmitError(404, "no residual")
                return self._send(200, res[0], "application/octet-stream", {"X-Fineray-Sha256": res[1]})
            raise SubmitError(404, f"no route GET {path}")

        def _post_round(self, silo: str, rno: int, kind: str, attempt: int) -> None:
            if kind == "update":
                status = fed.submit_update(silo, rno, self._body())
                return self._send(422 if status.startswith("rejected") else 200, {"status": status})
            if kind == "decline":
                return self._send(200, {"status": fed.submit_decline(silo, rno, str(self._json().get("reason")))})
            if kind == "key":
                body = self._json()
                status = fed.submit_key(silo, rno, attempt, bytes.fromhex(body["public_key"]),
                                        int(body["num_examples"]), body.get("metrics"))
                return self._send(200, {"status": status})
            return self._send(200, {"status": fed.submit_masked(silo, rno, attempt, self._body())})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


class _TLSServer(ThreadingHTTPServer):
    """Threading HTTP server doing the TLS handshake in the request thread (a slow client blocks nobody)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext):
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(30)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass


def server_context(certfile: str, keyfile: str, ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with ``ca_file`` client certificates are required (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if ca_file:
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def run_coordinator(cfg: RunConfig, host: str = "0.0.0.0", port: int = 8443, certfile: str | None = None,
                    keyfile: str | None = None, ca_file: str | None = None, tokens: dict[str, str] | None = None,
                    *, progress: bool = True, console: Any = None, start_wait_s: float = 60.0,
                    on_ready: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                    linger_s: float = 5.0) -> FederationResult | None:
    """Serves the federation of ``cfg.federated`` over HTTPS until every round is done.

    Args:
        cfg: Run config with a ``federated`` section (silo ``data`` is not used here).
        host: Bind address.
        port: TCP port (0 picks a free one; see ``on_ready``).
        certfile: Server certificate (PEM, may include the chain).
        keyfile: Server private key (PEM).
        ca_file: CA that signs the silos' client certificates; enables mutual TLS.
        tokens: ``{silo name: token}``; enables bearer-token authentication.
        progress: Print one line per round event.
        console: rich Console for progress lines.
        start_wait_s: Before round 1, wait this long for every silo (then go with ``min_silos``).
        on_ready: Called with the base URL once the server listens.
        stop: Set it to stop serving early (simulates a crash: nothing is finalised).
        linger_s: Keep answering ``done`` this long after the end so that polling silos exit cleanly.

    Returns:
        The :class:`FederationResult` (also written to the run folder), or None when stopped early.

    Raises:
        ConfigError: Invalid config, no certificate, or neither tokens nor ``ca_file`` (no authentication).
    """
    fcfg = federated_config(cfg)
    check_run_config(cfg, fcfg)
    if not certfile or not keyfile:
        raise ConfigError("the coordinator serves HTTPS only: give a server certificate and key")
    if not tokens and not ca_file:
        raise ConfigError("refusing to serve without authentication: give per-silo tokens and/or a CA for "
                          "mutual TLS")
    unknown = sorted(set(tokens or {}) - {s.name for s in fcfg.silos})
    if unknown:
        raise ConfigError(f"tokens for silos not in federated.silos: {unknown}")
    if console is None:
        from rich.console import Console

        console = Console()
    say = (lambda msg: console.print(msg, highlight=False)) if progress else (lambda msg: None)
    run_dir = federation_run_dir(cfg, fcfg)
    t0 = time.perf_counter()
    fed = Federation(cfg, fcfg, run_dir / "federation")
    if fed.resumed:
        say(f"resuming federation {cfg.output.name} after round {fed.round}")
    coord = Coordinator(cfg, fcfg, fed, run_dir, start_wait_s=start_wait_s, progress=say)
    server = _TLSServer((host, port), _make_handler(coord, tokens, bool(ca_file)),
                        server_context(certfile, keyfile, ca_file))
    url = f"https://{host if host not in ('0.0.0.0', '') else '127.0.0.1'}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    say(f"coordinator listening on {url} ({len(fcfg.silos)} silos, {fcfg.rounds} rounds, {fcfg.strategy})")
    if on_ready:
        on_ready(url)
    stop = stop or threading.Event()
    try:
        while not coord.done.is_set() and not stop.is_set():
            coord.step()
            time.sleep(0.2)
        if stop.is_set():
            return None
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
    return finalize(cfg, fcfg, fed, run_dir, comparison=None, wall_s=time.perf_counter() - t0)
