"""The networked coordinator: a :class:`Federation` behind HTTPS (Starlette + uvicorn, no pickle).

Organisations never share a Ray cluster: each silo runs :func:`fineray.federated.client.run_silo` on its
own machine and polls this server. Bodies are JSON for control messages and raw safetensors bytes for
tensors (endpoints and error codes: :mod:`._https`). Every request except ``/v1/health`` is authenticated:

* per-silo bearer tokens (``Authorization: Bearer <token>`` + ``X-Fineray-Silo: <name>``), compared in
  constant time; unknown silo or wrong token -> 401;
* and/or mutual TLS (``ca_file``): the client certificate must chain to the CA (else the handshake
  fails) and its common name must be the silo's name (else 403).

Submissions are idempotent (a repeat answers ``duplicate``). A monitor loop opens rounds once
``min_silos`` silos are online, enforces deadlines (:meth:`Federation.tick`) and evaluates the global
held-out set; state is checkpointed every round, so restarting the coordinator on the same
``output.name`` resumes at the next round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fineray.federated._https import check_tls_files, make_app, serve_https
from fineray.federated.config import FederatedConfig, federated_config
from fineray.federated.federation import Federation
from fineray.federated.outputs import check_run_config, federation_run_dir, finalize
from fineray.federated.report import FederationResult
from fineray.federated.silo import evaluate_adapter
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
                step = fed.secagg_task(silo)  # share | mask | unmask
                if step is not None:
                    return step
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
                          f"stragglers {row['stragglers']}, dropped {row['dropped']}{eps}")
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


def run_coordinator(cfg: RunConfig, host: str = "0.0.0.0", port: int = 8443, certfile: str | None = None,
                    keyfile: str | None = None, ca_file: str | None = None, tokens: dict[str, str] | None = None,
                    *, progress: bool = True, console: Any = None, start_wait_s: float = 60.0,
                    on_ready: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                    linger_s: float = 5.0, online_window_s: float = 30.0) -> FederationResult | None:
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
        online_window_s: A silo counts as online this long after its last request (rounds sample online
            silos; the final evaluation waits for them).

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
    check_tls_files(certfile, keyfile, ca_file)
    if console is None:
        from rich.console import Console

        console = Console()
    say = (lambda msg: console.print(msg, highlight=False)) if progress else (lambda msg: None)
    run_dir = federation_run_dir(cfg, fcfg)
    t0 = time.perf_counter()
    fed = Federation(cfg, fcfg, run_dir / "federation")
    if fed.resumed:
        say(f"resuming federation {cfg.output.name} after round {fed.round}")
    coord = Coordinator(cfg, fcfg, fed, run_dir, start_wait_s=start_wait_s, online_window_s=online_window_s,
                        progress=say)
    app = make_app(coord, tokens, mtls=bool(ca_file))
    stop = stop or threading.Event()
    with serve_https(app, host, port, certfile, keyfile, ca_file) as url:
        say(f"coordinator listening on {url} ({len(fcfg.silos)} silos, {fcfg.rounds} rounds, {fcfg.strategy})")
        if on_ready:
            on_ready(url)
        while not coord.done.is_set() and not stop.is_set():
            coord.step()
            time.sleep(0.2)
        if stop.is_set():
            return None
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.2)
    return finalize(cfg, fcfg, fed, run_dir, comparison=None, wall_s=time.perf_counter() - t0)
