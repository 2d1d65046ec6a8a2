"""The networked silo: polls the coordinator over HTTPS and trains on this organisation's private data.

``run_silo`` runs on the organisation's own machine. It fetches the shared run settings, then loops on
``GET /v1/task``: evaluate the global adapter on the local validation set, train a round (Ray Train on
the silo's own private Ray by default) and send only the update, or under secure aggregation a public
key and then a masked vector. Nothing but adapter tensors (safetensors), scalars and public keys leaves
the machine. Transport errors (coordinator restarting, network blips) are retried until
``max_wait_s`` without contact; a repeated submission is harmless (the coordinator answers
``duplicate``), and a silo restarted mid-round simply asks for its task again.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from fineray.federated.secagg import SecAggError
from fineray.federated.silo import SiloWorker
from fineray.train.config import RunConfig, apply_overrides, validate_config

__all__ = ["SiloAuthError", "SiloClient", "run_silo"]

log = logging.getLogger(__name__)


class SiloAuthError(PermissionError):
    """The coordinator refused this silo (401 wrong token / 403 certificate or name); not retried."""


class SiloClient:
    """Authenticated HTTPS calls to the coordinator.

    Args:
        url: ``https://host:port``.
        name: Silo name (sent as ``X-Fineray-Silo``; must match the client certificate's CN with mTLS).
        token: Bearer token, or None with mutual TLS only.
        ca: CA bundle that signed the coordinator's certificate (default: system CAs).
        cert: Client certificate (PEM) for mutual TLS.
        key: Its private key (PEM).
        timeout_s: Per-request timeout (uploads of large adapters need more).
    """

    def __init__(self, url: str, name: str, token: str | None = None, *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, timeout_s: float = 300.0) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        headers = {"X-Fineray-Silo": name}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.name = name
        self.http = httpx.Client(base_url=url.rstrip("/"), verify=ctx, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call; raises :class:`SiloAuthError` on 401/403, ``httpx.HTTPStatusError`` on other 4xx/5xx
        except 409 (state moved on) and 422 (update rejected), which are returned."""
        resp = self.http.request(method, path, **kw)
        if resp.status_code in (401, 403):
            raise SiloAuthError(f"coordinator refused silo {self.name!r} ({resp.status_code}): "
                                f"{_error(resp)}")
        if resp.status_code not in (409, 422) and resp.status_code >= 400:
            raise httpx.HTTPStatusError(f"{method} {path}: {resp.status_code} {_error(resp)}",
                                        request=resp.request, response=resp)
        return resp

    def close(self) -> None:
        self.http.close()


def _error(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error") or resp.json())
    except ValueError:
        return resp.text[:200]


def run_silo(coordinator_url: str, name: str, data: str, token: str | None = None, *, ca: str | None = None,
             cert: str | None = None, key: str | None = None, validation: str | float | None = 0.1,
             work_dir: str | Path | None = None, overrides: list[str] | None = None, trainer: str = "ray",
             num_cpus: int | None = None, poll_s: float = 1.0, max_wait_s: float = 600.0) -> dict[str, Any]:
    """Takes part in a federation until the coordinator says ``done``.

    Args:
        coordinator_url: ``https://HOST:PORT`` of the coordinator.
        name: This silo's name (as in the coordinator's ``federated.silos``).
        data: Private training data (file or ``fineray:`` name); never sent anywhere.
        token: Per-silo bearer token.
        ca: CA bundle of the coordinator's certificate.
        cert: Client certificate for mutual TLS (CN = ``name``).
        key: Client private key.
        validation: Local validation set: a file, or a fraction held out of ``data``.
        work_dir: Private working folder (default ``./fineray-silo-<name>``).
        overrides: ``key=value`` overrides of the shared settings for this machine (e.g.
            ``model.base=/models/smollm2``, ``scaling.num_workers=4``, ``scaling.use_gpu=true``).
        trainer: ``"ray"`` (Ray Train on a private local Ray, or ``cluster.address``) or ``"local"``
            (the loop in this process).
        num_cpus: CPUs of the private Ray (``trainer="ray"``) / torch threads (``"local"``).
        poll_s: Polling interval while waiting.
        max_wait_s: Give up after this long without reaching the coordinator.

    Returns:
        ``{"rounds_trained", "evaluations", "final_version", "rejections"}``.

    Raises:
        SiloAuthError: Wrong token or certificate (401/403).
        TimeoutError: The coordinator was unreachable for ``max_wait_s``.
    """
    client = SiloClient(coordinator_url, name, token, ca=ca, cert=cert, key=key)
    try:
        settings = _call(client, "GET", "/v1/config", max_wait_s).json()["settings"]
        cfg = validate_config(apply_overrides(settings, list(overrides or [])), f"silo {name}")
        work = Path(work_dir or f"fineray-silo-{name}").resolve()
        if trainer == "ray":
            from fineray.base.connect import ray_cluster

            with ray_cluster(cfg.cluster.address, num_cpus or cfg.cluster.num_cpus):
                worker = SiloWorker(name, cfg, data, validation, work, trainer="ray")
                return _loop(client, worker, cfg, poll_s, max_wait_s)
        worker = SiloWorker(name, cfg, data, validation, work, threads=num_cpus, trainer="local")
        return _loop(client, worker, cfg, poll_s, max_wait_s)
    finally:
        client.close()


def _call(client: SiloClient, method: str, path: str, max_wait_s: float, **kw: Any) -> httpx.Response:
    """A request retried on transport errors and 5xx (coordinator restarting) for up to ``max_wait_s``."""
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            return client.request(method, path, **kw)
        except httpx.TransportError as e:
            err: Exception = e
        except httpx.HTTPStatusError as e:
            if e.response.status_code < 500:
                raise
            err = e
        if time.monotonic() - start > max_wait_s:
            raise TimeoutError(f"coordinator unreachable for {max_wait_s:.0f} s: {err}") from err
        log.info("silo %s: %s; retrying in %.1f s", client.name, err, delay)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _loop(client: SiloClient, worker: SiloWorker, cfg: RunConfig, poll_s: float, max_wait_s: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"rounds_trained": 0, "evaluations": 0, "final_version": None, "rejections": []}
    while True:
        task = _call(client, "GET", "/v1/task", max_wait_s).json()
        status = task["status"]
        if status == "done":
            summary["final_version"] = task["version"]
            return summary
        if status == "wait":
            time.sleep(min(poll_s, float(task.get("retry_after", poll_s))))
            continue
        if status == "evaluate":
            blob = _call(client, "GET", "/v1/adapter", max_wait_s).content
            res = _residual(client, max_wait_s)
            try:
                out = worker.evaluate(blob, res, max_examples=int(task.get("max_examples", 200)))
                body = {"version": task["version"], "loss": out["loss"], "tokens": out["tokens"]}
            except Exception as e:  # noqa: BLE001 - reported to the coordinator instead of looping on it
                body = {"version": task["version"], "loss": None, "error": f"{type(e).__name__}: {e}"[:300]}
            _call(client, "POST", "/v1/eval", max_wait_s, json=body)
            summary["evaluations"] += 1
        elif status == "train":
            resp = _call(client, "GET", "/v1/adapter", max_wait_s)
            if resp.headers.get("X-Fineray-Sha256") != task["adapter_sha"]:
                continue  # the global adapter moved on between task and download: ask again
            res = _residual(client, max_wait_s) if task.get("residual_sha") else None
            out = worker.train(task, resp.content, res)
            rno = task["round"]
            if not task.get("secagg"):
                r = _call(client, "POST", f"/v1/rounds/{rno}/update", max_wait_s, content=out["update"],
                          headers={"Content-Type": "application/octet-stream"})
                if r.status_code == 422:
                    summary["rejections"].append({"round": rno, "reason": r.json().get("status")})
            elif out["self_check"]:
                _call(client, "POST", f"/v1/rounds/{rno}/decline", max_wait_s,
                      json={"reason": "; ".join(out["self_check"])})
                summary["rejections"].append({"round": rno, "reason": out["self_check"]})
            else:
                body = {"keys": worker.secagg_keys(rno), "num_examples": out["num_examples"], "metrics": out["metrics"]}
                _call(client, "POST", f"/v1/rounds/{rno}/keys", max_wait_s, json=body)
            summary["rounds_trained"] += 1
        elif status in _SECAGG_STEPS:
            method, path = _SECAGG_STEPS[status]
            try:
                answer = getattr(worker, method)(task)
            except (KeyError, SecAggError) as e:  # restarted (keys lost) or refused: this silo drops this round
                log.warning("silo %s cannot %s: %s", client.name, status, e)
                time.sleep(poll_s)
                continue
            kw: dict[str, Any] = ({"content": answer, "headers": {"Content-Type": "application/octet-stream"}}
                                  if isinstance(answer, bytes) else {"json": answer})
            _call(client, "POST", f"/v1/rounds/{task['round']}/{path}", max_wait_s, **kw)
        else:
            raise ValueError(f"unknown task status {status!r} from the coordinator")


#: Secure-aggregation task status -> (the ``SiloWorker`` method that answers it, the endpoint it goes to).
_SECAGG_STEPS = {"share": ("secagg_share", "shares"), "mask": ("secagg_mask", "masked"),
                 "unmask": ("secagg_reveal", "reveal")}


def _residual(client: SiloClient, max_wait_s: float) -> bytes | None:
    try:
        return _call(client, "GET", "/v1/residual", max_wait_s).content
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 404:  # this strategy folds no residual
            return None
        raise
