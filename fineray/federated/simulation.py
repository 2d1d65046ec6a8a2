"""Federated simulation on one Ray cluster: every silo is a Ray actor, the driver is the coordinator.

``run_simulation(cfg)`` drives a :class:`~fineray.federated.federation.Federation` exactly as the HTTPS
coordinator does, with Ray calls instead of HTTP: per round, every silo evaluates the current global
adapter on its validation set (the driver evaluates the global held-out set), the sampled participants
train from it in their actors (:class:`~fineray.federated.silo.SiloWorker`, the foundation's loop
in-process) and return only safetensors bytes, or a public key and a masked vector under secure
aggregation. A silo that misses ``round_timeout_s`` is reported as a straggler and its actor is killed
(and recreated for the next round), so a hung silo never blocks the federation. ``silos[].resources``
become actor resources: ``{"silo:acme": 1}`` places the actor only on nodes advertising it (a private
local cluster advertises every silo's resources so the simulation runs on a laptop).

With ``federated.baselines`` the same data also trains local-only adapters (each silo alone for the
federation's total local steps) and a centralised adapter (pooled data, the same total number of steps
as all silos together), for the comparison table.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fineray.base.connect import init_ray, shutdown_ray
from fineray.federated.config import FederatedConfig, SiloSpec, federated_config
from fineray.federated.federation import Federation
from fineray.federated.outputs import check_run_config, federation_run_dir, finalize
from fineray.federated.report import FederationResult, print_federation
from fineray.federated.silo import SiloWorker, evaluate_adapter
from fineray.federated.wire import SubmitError, pack_tensors
from fineray.train.config import ConfigError, RunConfig

__all__ = ["FederationError", "FederationResult", "print_federation", "run_simulation"]

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A federation that cannot run (placement impossible, every silo failing); the message says why."""


class _Silos:
    """The silo actors, recreated lazily after a straggler was killed."""

    def __init__(self, cfg: RunConfig, fcfg: FederatedConfig, run_dir: Path) -> None:
        self.cfg, self.fcfg, self.run_dir = cfg, fcfg, run_dir
        self.specs = {s.name: s for s in fcfg.silos}
        self.actors: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        import ray

        if name not in self.actors:
            s: SiloSpec = self.specs[name]
            threads = self.fcfg.threads_per_silo or max(1, math.ceil(s.num_cpus))
            cls = ray.remote(SiloWorker).options(num_cpus=s.num_cpus, num_gpus=s.num_gpus or None,
                                                 resources=s.resources or None, max_restarts=0)
            self.actors[name] = cls.remote(name, self.cfg.to_dict(), s.data, s.validation,
                                           str(self.run_dir / "silos" / name), threads=threads, trainer="local")
        return self.actors[name]

    def kill(self, name: str) -> None:
        import ray

        actor = self.actors.pop(name, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def close(self) -> None:
        for name in list(self.actors):
            self.kill(name)


def _check_placement(fcfg: FederatedConfig) -> None:
    import ray

    have = ray.cluster_resources()
    for s in fcfg.silos:
        need = {"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {}), **(s.resources or {})}
        for key, amount in need.items():
            if have.get(key, 0) < amount:
                raise FederationError(f"silo {s.name!r} needs {key}={amount} but the Ray cluster has "
                                      f"{have.get(key, 0)}; start a node with that resource "
                                      f"(ray start --resources='{{\"{key}\": {amount}}}') or change federated.silos")


def _evaluate_version(fed: Federation, silos: _Silos, cfg: RunConfig, fcfg: FederatedConfig, run_dir: Path) -> None:
    """Every silo's validation loss of the current global version, and the held-out loss (driver)."""
    import ray

    version = fed.round
    blob, _, _ = fed.adapter_blob()
    res = fed.residual_blob()
    res_blob = res[0] if res else None
    refs = {silos.get(s).evaluate.remote(blob, res_blob, None, fcfg.eval_max_examples): s
            for s in fed.silos if not fed.has_eval(version, s)}
    if fcfg.eval_data and not fed.has_eval(version, "held_out"):
        out = evaluate_adapter(cfg, blob, res_blob, fcfg.eval_data, fcfg.eval_max_examples, run_dir / "eval")
        fed.record_eval(version, "held_out", out["loss"], out["tokens"])
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=fcfg.round_timeout_s)
    for ref in ready:
        try:
            out = ray.get(ref)
            fed.record_eval(version, refs[ref], out["loss"], out["tokens"])
        except Exception as e:  # noqa: BLE001 - a failing silo is reported, the federation goes on
            fed.record_eval(version, refs[ref], None, error=f"{type(e).__name__}: {e}"[:300])
    for ref in pending:
        silos.kill(refs[ref])
        fed.record_eval(version, refs[ref], None, error="evaluation timed out")


def _train_round(fed: Federation, silos: _Silos, fcfg: FederatedConfig) -> dict[str, Any]:
    """Runs the open round to its end; returns the history row."""
    cur = fed.current
    assert cur is not None
    rno = cur.round
    res = fed.residual_blob()
    res_blob = res[0] if res else None
    refs = {}
    for s in cur.participants:
        blob, _, _ = fed.adapter_blob(s)
        refs[silos.get(s).train.remote(fed.train_task(s), blob, res_blob)] = s
    results = dict(_gather(refs, fed, silos, failed=lambda s, e: fed.submit_decline(
        s, rno, f"local training failed: {type(e).__name__}: {str(e)[:200]}")))
    if not fcfg.secure_aggregation.enabled:
        for silo, out in sorted(results.items()):
            fed.submit_update(silo, rno, out["update"])
        return fed.tick(force=True) or fed.history[-1]
    for silo, out in sorted(results.items()):
        if out["self_check"]:
            fed.submit_decline(silo, rno, "; ".join(out["self_check"]))
    key_refs = {silos.get(s).secagg_keys.remote(rno): s for s, out in results.items() if not out["self_check"]}
    for silo, keys in _gather(key_refs, fed, silos):
        fed.submit_key(silo, rno, keys, results[silo]["num_examples"], results[silo]["metrics"])
    # Secure aggregation's phases: every silo the phase expects is asked once; whoever fails or misses the
    # deadline has dropped, and the round goes on without it (fewer than the threshold fail it).
    while (row := fed.tick(force=True)) is None:
        method, submit = _SECAGG_STEPS[fed.current.phase]
        step_refs = {getattr(silos.get(s), method).remote(fed.secagg_task(s)): s for s in fed.current.secagg.pending()}
        for silo, answer in _gather(step_refs, fed, silos):
            try:
                getattr(fed, submit)(silo, rno, answer)
            except SubmitError as e:
                log.warning("silo %s: %s refused: %s", silo, submit, e)
    return row


#: Secure-aggregation phase -> (the silo actor's method, the Federation's submit method).
_SECAGG_STEPS = {"share": ("secagg_share", "submit_shares"), "mask": ("secagg_mask", "submit_masked"),
                 "unmask": ("secagg_reveal", "submit_reveal")}


def _gather(refs: dict[Any, str], fed: Federation, silos: _Silos,
            failed: Callable[[str, Exception], None] | None = None) -> Iterator[tuple[str, Any]]:
    """``(silo, answer)`` of the calls that finished before the open phase's deadline; the silos of the others
    are killed (stragglers: a late answer would be ignored anyway). A call that raised calls ``failed``."""
    import ray

    if not refs:
        return
    cur = fed.current
    timeout = max(0.0, cur.deadline - fed.clock()) if cur is not None else None
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    for ref in pending:
        silos.kill(refs[ref])
    for ref in ready:
        try:
            answer = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a failing silo is reported, the federation goes on
            log.warning("silo %s failed: %s", refs[ref], e)
            if failed is not None:
                failed(refs[ref], e)
            continue
        yield refs[ref], answer


def _baselines(cfg: RunConfig, fcfg: FederatedConfig, fed: Federation, silos: _Silos, run_dir: Path
               ) -> list[dict[str, Any]]:
    """Local-only and centralised adapters trained on the same data, evaluated like the global one."""
    import ray

    from fineray.federated import global_model as gm

    names = [s.name for s in fcfg.silos]
    tensors, config = gm.initial_adapter(cfg, fcfg.seed, fed.global_rank)
    init_blob = pack_tensors(tensors, {"version": 0, "adapter_config": config})
    steps = (fcfg.local_steps or 0) * fcfg.rounds or None
    epochs = fcfg.local_epochs * fcfg.rounds if fcfg.local_epochs else None
    base_task = {"round": 0, "adapter_config": config, "local_steps": steps, "local_epochs": epochs,
                 "proximal_mu": 0.0, "freeze_lora_a": False, "secagg": None}
    local_refs = {s: silos.get(s).train.remote(base_task, init_blob) for s in names}
    # Centralised: every silo's training split pooled, as many steps as all silos did together.
    infos = ray.get([silos.get(s).info.remote() for s in names])
    pooled = run_dir / "baselines" / "pooled_train.jsonl"
    pooled.parent.mkdir(parents=True, exist_ok=True)
    pooled.write_text("".join(Path(i["train"]).read_text() for i in infos))
    # 0 reserved CPUs: the silo actors keep theirs, and a reservation could never be met on a full cluster.
    central = ray.remote(SiloWorker).options(num_cpus=0).remote(
        "centralised", cfg.to_dict(), str(pooled), None, str(run_dir / "baselines" / "centralised"),
        threads=fcfg.threads_per_silo or max(1, math.ceil(fcfg.silos[0].num_cpus)))
    c_task = {**base_task, "local_steps": steps * len(names) if steps else None,
              "local_epochs": epochs}  # an epoch of pooled data already holds every silo's data
    central_out = central.train.remote(c_task, init_blob)
    models = {f"local:{s}": ray.get(local_refs[s])["update"] for s in names}
    models["centralised"] = ray.get(central_out)["update"]
    ray.kill(central)
    models["federated"] = pack_tensors(*_export_meta(fed))

    def losses(blob: bytes) -> dict[str, Any]:
        refs = {s: silos.get(s).evaluate.remote(blob, None, None, fcfg.eval_max_examples) for s in names}
        out = {s: ray.get(r)["loss"] for s, r in refs.items()}
        if fcfg.eval_data:
            out["held_out"] = evaluate_adapter(cfg, blob, None, fcfg.eval_data, fcfg.eval_max_examples,
                                               run_dir / "eval")["loss"]
        return out

    def with_config(blob: bytes) -> bytes:
        from fineray.federated.wire import unpack_tensors

        t, meta = unpack_tensors(blob)
        return pack_tensors(t, {**meta, "adapter_config": meta.get("adapter_config") or config})

    ev = {k: losses(with_config(b)) for k, b in models.items()}

    def mean(xs: list[Any]) -> float | None:
        xs = [x for x in xs if isinstance(x, (int, float))]
        return sum(xs) / len(xs) if xs else None

    local = [ev[f"local:{s}"] for s in names]
    total_steps = (steps or 0) * len(names) or None
    return [
        {"method": "local-only", "mean_val_loss": mean([e[s] for e, s in zip(local, names, strict=True)]),
         "cross_val_loss": mean([e[s] for e in local for s in names]),
         "held_out_loss": mean([e.get("held_out") for e in local]), "steps": total_steps},
        {"method": "federated", "mean_val_loss": mean([ev["federated"][s] for s in names]),
         "cross_val_loss": mean([ev["federated"][s] for s in names]),
         "held_out_loss": ev["federated"].get("held_out"), "steps": total_steps},
        {"method": "centralised", "mean_val_loss": mean([ev["centralised"][s] for s in names]),
         "cross_val_loss": mean([ev["centralised"][s] for s in names]),
         "held_out_loss": ev["centralised"].get("held_out"), "steps": total_steps},
    ]


def _export_meta(fed: Federation) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors, config = fed.export()
    return tensors, {"adapter_config": config}


def _check_silo_data(cfg: RunConfig, fcfg: FederatedConfig) -> None:
    """Every silo's data readable and well-formed (file and line named) before Ray starts."""
    from fineray.train.data import DataError
    from fineray.train.launcher import check_run_data

    for s in fcfg.silos:
        silo_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": s.data})})
        try:
            check_run_data(silo_cfg, check_size=False)
        except DataError as e:
            raise DataError(f"federated.silos[{s.name}].data: {e}") from None


def run_simulation(cfg: RunConfig, *, progress: bool = True, console: Any = None) -> FederationResult:
    """Simulates the federation of ``cfg.federated`` on Ray and writes the run folder.

    Starts a private local Ray (``cluster.num_cpus``, advertising the silos' custom resources) unless Ray
    is initialised or ``cluster.address`` is set. Re-running with the same ``output.name`` resumes from
    the last completed round.

    Args:
        cfg: Run config with a ``federated`` section (every silo needs ``data``).
        progress: Print one line per round.
        console: rich Console for the progress lines (default: a new one).

    Returns:
        The :class:`FederationResult` (also in ``summary.json``); print it with :func:`print_federation`.

    Raises:
        ConfigError: Invalid ``federated`` section or run config.
        FederationError: A silo cannot be placed on the cluster.
    """

    fcfg = federated_config(cfg)
    check_run_config(cfg, fcfg)
    missing = [s.name for s in fcfg.silos if not s.data]
    if missing:
        raise ConfigError(f"invalid config: federated.silos: {missing} have no 'data' (needed in simulation)")
    _check_silo_data(cfg, fcfg)
    from fineray.train.model import resolve_base

    resolve_base(cfg.model.base)  # build/convert the cached base once, before the actors need it
    run_dir = federation_run_dir(cfg, fcfg)
    if console is None:
        from rich.console import Console

        console = Console()
    t0 = time.perf_counter()
    custom: dict[str, float] = {}
    for s in fcfg.silos:
        for k, v in (s.resources or {}).items():
            custom[k] = custom.get(k, 0) + v
    started = init_ray(cfg.cluster.address, cfg.cluster.num_cpus, resources=custom or None)
    silos = _Silos(cfg, fcfg, run_dir)
    try:
        _check_placement(fcfg)
        fed = Federation(cfg, fcfg, run_dir / "federation")
        if fed.resumed and progress:
            console.print(f"resuming federation {cfg.output.name} after round {fed.round}")
        while True:
            _evaluate_version(fed, silos, cfg, fcfg, run_dir)
            if fed.round:
                fed.save()  # persist the evaluations of the version just measured
            if fed.finished:
                break
            if fed.open_round() is None:
                raise FederationError("could not open a round: fewer silos than federated.min_silos")
            row = _train_round(fed, silos, fcfg)
            if progress:
                eps = f", epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
                rej = f", rejected {sorted(row['rejected'])}" if row["rejected"] else ""
                late = f", stragglers {row['stragglers']}" if row["stragglers"] else ""
                late += f", dropped {row['dropped']}" if row["dropped"] else ""
                console.print(f"round {row['round']}/{fcfg.rounds}: {row['status']}, {len(row['accepted'])}/"
                              f"{len(row['participants'])} accepted{rej}{late}{eps} ({row['wall_s']:.1f} s)",
                              highlight=False)
        comparison = _baselines(cfg, fcfg, fed, silos, run_dir) if fcfg.baselines else None
    finally:
        silos.close()
        if started:
            shutdown_ray()
    return finalize(cfg, fcfg, fed, run_dir, comparison=comparison, wall_s=time.perf_counter() - t0)
