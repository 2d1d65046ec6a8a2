"""The coordinator's federation state machine, shared by the Ray simulation and the HTTPS coordinator.

Transport-agnostic and thread-safe: the simulation driver and the HTTP handlers call the same methods.
A round goes::

    open_round -> [train: updates | (secagg) public keys] -> [(secagg) share -> mask -> unmask] -> close_round

* Participants are sampled per round (``fraction_fit``, at least ``min_silos``) among available silos.
* Submissions are idempotent per ``(round, phase, silo)``: a silo that reconnects and sends again gets
  ``duplicate`` and the first copy counts.
* Updates are screened on arrival (malformed body, NaN/Inf, wrong keys/shapes, FFA-LoRA's frozen A
  changed, delta norm over ``max_update_norm``); a rejected silo is reported and the round goes on.
* :meth:`tick` enforces deadlines: after ``round_timeout_s`` the round closes with what arrived
  (late silos are reported as stragglers). Under secure aggregation each later phase has
  ``mask_timeout_s``; a silo that shared its keys but never sent its masked vector is dropped, its masks
  are removed with the survivors' shares, and the round completes without it (:mod:`._secagg_round`);
  fewer survivors than the threshold fail the round.
* A round with fewer than ``min_silos`` accepted contributions leaves the global adapter unchanged.
* Every closed round is checkpointed (:mod:`.state`); a new instance on the same folder resumes.

What is done with a round's contributions (screening, decoding the secure sum, aggregating) is in
:mod:`._aggregation`.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fineray.federated import global_model as gm
from fineray.federated._aggregation import (
    RoundState,
    aggregate_round,
    round_row,
    screen_update,
    trainable_keys,
    unmask_mean,
)
from fineray.federated._lora import flatten
from fineray.federated._secagg_round import SecAggRound
from fineray.federated.config import FederatedConfig
from fineray.federated.dp import DPAccountant
from fineray.federated.state import FederationSnapshot, load_snapshot, save_snapshot
from fineray.federated.wire import SubmitError, pack_tensors, sha256_bytes
from fineray.train.config import RunConfig

__all__ = ["Federation", "RoundState", "SubmitError", "compat_hash", "trainable_keys"]


def compat_hash(run_cfg: RunConfig, fcfg: FederatedConfig) -> str:
    """Hash of the settings a checkpoint depends on (rounds, timeouts and paths may change on resume)."""
    import hashlib
    import json

    blob = {"base": run_cfg.model.base, "lora": run_cfg.lora.model_dump(mode="json"), "strategy": fcfg.strategy,
            "options": fcfg.strategy_options, "dp": fcfg.dp.model_dump(mode="json"),
            "secagg": fcfg.secure_aggregation.enabled, "silos": sorted((s.name, s.rank) for s in fcfg.silos)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Federation:
    """Global adapter, rounds, submissions, aggregation, privacy accounting and checkpoints.

    Args:
        run_cfg: The run config (model, LoRA, local training settings).
        fcfg: The validated federated section.
        state_dir: Checkpoint folder; an existing checkpoint there is resumed.
        clock: Monotonic clock in seconds (tests pass a fake one).
        noise_generator: DP noise source (default: seeded from ``os.urandom``).
        init_adapter: ``() -> (tensors, adapter_config)`` for round 0 (default: PEFT's init of the base).
    """

    def __init__(self, run_cfg: RunConfig, fcfg: FederatedConfig, state_dir: str | Path, *,
                 clock: Callable[[], float] = time.monotonic, noise_generator: torch.Generator | None = None,
                 init_adapter: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> None:
        self.run_cfg, self.fcfg, self.state_dir = run_cfg, fcfg, Path(state_dir)
        self.strategy = fcfg.strategy_obj
        self.clock = clock
        self.silos = [s.name for s in fcfg.silos]
        self.silo_ids = {name: i for i, name in enumerate(sorted(self.silos))}
        self.silo_rank = {s.name: s.rank or run_cfg.lora.r for s in fcfg.silos}
        self.global_rank = max([run_cfg.lora.r, *self.silo_rank.values()])
        self._lock = threading.RLock()
        self._noise = noise_generator
        self.accountant = (DPAccountant(fcfg.dp.noise_multiplier, fcfg.participants_per_round() / len(self.silos),
                                        fcfg.dp.delta) if fcfg.dp.enabled else None)
        self.current: RoundState | None = None
        self.last_seen: dict[str, float] = {}
        self.config_hash = compat_hash(run_cfg, fcfg)
        snap = load_snapshot(self.state_dir, self.strategy)
        self.resumed = snap is not None
        if snap is None:
            init = init_adapter or (lambda: gm.initial_adapter(run_cfg, fcfg.seed, self.global_rank))
            tensors, config = init()
            snap = FederationSnapshot(round=0, adapter=tensors, adapter_config=config, config_hash=self.config_hash)
            save_snapshot(self.state_dir, snap, self.strategy)
        elif snap.config_hash and snap.config_hash != self.config_hash:
            from fineray.train.config import ConfigError

            raise ConfigError(f"the federation state in {self.state_dir} was made with a different model, LoRA, "
                              "strategy, privacy or silo set; resume with the same settings or use another "
                              "output.name")
        self.round = snap.round
        self.adapter, self.adapter_config = snap.adapter, snap.adapter_config
        self.residual, self.strategy_state = snap.residual, snap.strategy_state
        self.history, self.evals = snap.history, snap.evals
        if self.accountant is not None and snap.dp_rounds:
            self.accountant.step(snap.dp_rounds)
        self._blobs: dict[str, tuple[bytes, str]] = {}

    # ------------------------------------------------------------------ read side
    @property
    def finished(self) -> bool:
        """All rounds are done."""
        return self.round >= self.fcfg.rounds

    @property
    def scaling(self) -> float:
        """PEFT scaling of the global adapter."""
        return gm.lora_scaling(self.adapter_config, self.global_rank)

    def epsilon(self) -> float | None:
        """Epsilon at ``dp.delta`` spent so far (None without DP)."""
        return None if self.accountant is None else self.accountant.epsilon

    def adapter_blob(self, silo: str | None = None) -> tuple[bytes, str, dict[str, Any]]:
        """``(safetensors bytes, sha256, adapter_config)`` of the current global adapter at ``silo``'s rank."""
        with self._lock:
            r = self.silo_rank.get(silo, self.global_rank) if silo else self.global_rank
            key = f"{self.round}:{r}"
            if key not in self._blobs:
                tensors, config = gm.to_silo_rank(self.adapter, self.adapter_config, r)
                blob = pack_tensors(tensors, {"version": self.round, "adapter_config": config})
                self._blobs[key] = (blob, sha256_bytes(blob))
            blob, sha = self._blobs[key]
            return blob, sha, gm.to_silo_rank(self.adapter, self.adapter_config, r)[1]

    def residual_blob(self) -> tuple[bytes, str] | None:
        """``(bytes, sha256)`` of the folded base residual, or None."""
        with self._lock:
            if not self.residual:
                return None
            key = f"{self.round}:residual"
            if key not in self._blobs:
                blob = pack_tensors(gm.residual_to_tensors(self.residual), {"version": self.round})
                self._blobs[key] = (blob, sha256_bytes(blob))
            return self._blobs[key]

    def train_task(self, silo: str) -> dict[str, Any]:
        """What a participant needs to train round ``current.round`` (JSON-able)."""
        with self._lock:
            cur = self._require_round()
            f = self.fcfg
            _, sha, config = self.adapter_blob(silo)
            res = self.residual_blob()
            sa = f.secure_aggregation
            return {
                "round": cur.round, "version": self.round, "adapter_sha": sha,
                "residual_sha": res[1] if res else None, "adapter_config": config,
                "local_steps": f.local_steps, "local_epochs": f.local_epochs, "proximal_mu": f.proximal_mu,
                "freeze_lora_a": not f.trains_a, "max_update_norm": f.max_update_norm,
                "trainable_keys": trainable_keys(self.adapter, f), "heterogeneous": self.strategy.heterogeneous_rank,
                "secagg": None if not sa.enabled else {
                    "id": self.silo_ids[silo], "config": dataclasses.asdict(sa.protocol_config(len(self.silos)))},
                "dp_clip": f.dp.clip_norm if f.dp.enabled and sa.enabled else None,
                "uniform_weight": f.dp.enabled,
                "deadline_in_s": max(0.0, cur.deadline - self.clock()),
            }

    def _require_round(self, round_no: int | None = None) -> RoundState:
        cur = self.current
        if cur is None:
            raise SubmitError(409, f"no round is open (completed rounds: {self.round})")
        if round_no is not None and round_no != cur.round:
            raise SubmitError(409, f"round {round_no} is not open (open: {cur.round})")
        return cur

    # ------------------------------------------------------------------ rounds
    def open_round(self, available: Iterable[str] | None = None) -> RoundState | None:
        """Samples participants among ``available`` silos and opens the next round.

        Returns:
            The new round, or None when finished, a round is already open, or fewer than
            ``min_silos`` silos are available.
        """
        with self._lock:
            if self.finished or self.current is not None:
                return None
            pool = sorted(set(self.silos if available is None else available) & set(self.silos))
            if len(pool) < self.fcfg.min_silos:
                return None
            k = self.fcfg.participants_per_round(len(pool))
            rng = random.Random(f"{self.fcfg.seed}:{self.round + 1}")
            chosen = sorted(rng.sample(pool, k))
            now = self.clock()
            sa = self.fcfg.secure_aggregation
            secagg = None
            if sa.enabled:  # the masked vector: the trainable keys' delta, flattened, and the weight
                size = flatten({k: self.adapter[k] for k in trainable_keys(self.adapter, self.fcfg)})[0].numel() + 1
                secagg = SecAggRound(self.silo_ids, sa.protocol_config(len(self.silos)), size, sa.threshold)
            self.current = RoundState(round=self.round + 1, participants=chosen,
                                      planned=self.fcfg.participants_per_round(), opened_at=now,
                                      deadline=now + self.fcfg.round_timeout_s, secagg=secagg)
            return self.current

    def submit_update(self, silo: str, round_no: int, blob: bytes) -> str:
        """A plain (unmasked) update: safetensors with metadata ``{num_examples, metrics}``.

        Returns:
            ``"accepted"``, ``"rejected: <reasons>"`` or ``"duplicate"``.

        Raises:
            SubmitError: Wrong round/phase, not a participant, or secure aggregation is on.
        """
        with self._lock:
            cur = self._check_participant(silo, round_no)
            if self.fcfg.secure_aggregation.enabled:
                raise SubmitError(409, "secure aggregation is on: send a public key, then a masked vector")
            if silo in cur.responded:
                return "duplicate"
            reasons, entry = screen_update(blob, self.adapter, self.adapter_config, self.global_rank,
                                           self.fcfg, self.strategy.heterogeneous_rank)
            if reasons:
                cur.responded[silo] = "rejected"
                cur.rejections.extend((silo, r) for r in reasons)
                return "rejected: " + "; ".join(reasons)
            cur.responded[silo] = "update"
            cur.updates[silo] = entry
            return "accepted"

    def submit_decline(self, silo: str, round_no: int, reason: str) -> str:
        """A silo reporting that its own update failed its checks (used under secure aggregation)."""
        with self._lock:
            cur = self._check_participant(silo, round_no)
            if silo in cur.responded:
                return "duplicate"
            cur.responded[silo] = "rejected"
            cur.rejections.append((silo, f"self-check: {reason}"))
            return "recorded"

    def submit_key(self, silo: str, round_no: int, keys: dict[str, Any], num_examples: int,
                   metrics: dict[str, Any] | None = None) -> str:
        """Secure aggregation: the silo's advertised keys (:class:`~.secagg.AdvertisedKeys` JSON) after training."""
        with self._lock:
            cur = self._check_participant(silo, round_no)
            sa = self._secagg_round(round_no)
            if cur.phase != "train":
                raise SubmitError(409, f"round {round_no} no longer collects keys (phase {cur.phase})")
            if silo in cur.responded:
                return "duplicate"
            status = sa.add_keys(silo, keys, num_examples, dict(metrics or {}))
            cur.responded[silo] = "key"
            return status

    def secagg_task(self, silo: str) -> dict[str, Any] | None:
        """``silo``'s secure-aggregation step in the open round (``{"status": share|mask|unmask, "round", ...}``)."""
        with self._lock:
            cur = self.current
            task = cur.secagg.task(silo) if cur is not None and cur.secagg is not None else None
            return None if task is None else {**task, "round": cur.round}

    def submit_shares(self, silo: str, round_no: int, shares: dict[str, str]) -> str:
        """Secure aggregation: ``{recipient id: hex ciphertext}`` of the silo's key shares, one per peer."""
        with self._lock:
            return self._secagg_round(round_no).add_shares(silo, shares)

    def submit_masked(self, silo: str, round_no: int, blob: bytes) -> str:
        """Secure aggregation: the silo's masked vector (safetensors, ``uint32``/``uint64``)."""
        with self._lock:
            return self._secagg_round(round_no).add_masked(silo, blob)

    def submit_reveal(self, silo: str, round_no: int, reveal: dict[str, Any]) -> str:
        """Secure aggregation: a survivor's shares of the survivors' seeds and of the dropped silos' mask keys."""
        with self._lock:
            return self._secagg_round(round_no).add_reveal(silo, reveal)

    def _secagg_round(self, round_no: int) -> SecAggRound:
        cur = self._require_round(round_no)
        if cur.secagg is None:
            raise SubmitError(409, "secure aggregation is off: send the update itself")
        return cur.secagg

    def _check_participant(self, silo: str, round_no: int) -> RoundState:
        cur = self._require_round(round_no)
        if silo not in cur.participants:
            raise SubmitError(409, f"silo {silo!r} is not a participant of round {round_no}")
        return cur

    def tick(self, force: bool = False) -> dict[str, Any] | None:
        """Advances the open round when its phase is complete or past its deadline; returns the history row if
        the round closed. ``force`` ends the phase now (the simulation knows when nobody else will answer)."""
        with self._lock:
            cur = self.current
            if cur is None:
                return None
            now = self.clock()
            sa = cur.secagg
            if cur.phase == "train":
                done = all(s in cur.responded for s in cur.participants)
            else:
                done = sa is not None and not sa.pending()
            if not (done or force or now >= cur.deadline):
                return None
            if sa is None:
                return self.close_round()
            failure = sa.advance()
            if failure is not None:
                return self.close_round(failure=f"secure aggregation: {failure}")
            if sa.phase == "done":
                return self.close_round()
            cur.phase, cur.deadline = sa.phase, now + self.fcfg.secure_aggregation.mask_timeout_s
            return None

    # ------------------------------------------------------------------ aggregation
    def close_round(self, failure: str | None = None) -> dict[str, Any]:
        """Aggregates what arrived, updates the global adapter, checkpoints; returns the history row."""
        with self._lock:
            cur = self._require_round()
            f = self.fcfg
            contributed, row = round_row(cur, self.clock(), self.epsilon())
            if failure is None and len(contributed) < f.min_silos:
                failure = f"only {len(contributed)} accepted updates (min_silos={f.min_silos})"
            if failure is None:
                try:
                    mean = unmask_mean(cur, f, self.adapter, self._noise) if cur.secagg else None
                    row.update(self._aggregate(cur, contributed, mean))
                    row["accepted"] = contributed
                except (ValueError, RuntimeError) as e:  # a strategy refusing its inputs fails the round only
                    failure = f"aggregation failed: {e}"
            row["status"] = "ok" if failure is None else f"failed: {failure}"
            row["epsilon"] = self.epsilon()
            self.history.append(row)
            self.round += 1
            self.current = None
            self._blobs = {}
            self.save()
            return row

    def _aggregate(self, cur: RoundState, contributed: list[str],
                   mean_delta: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Aggregates (see :func:`~._aggregation.aggregate_round`); the result becomes the global state."""
        out, new, result = aggregate_round(cur, contributed, mean_delta, strategy=self.strategy,
                                           fcfg=self.fcfg, adapter=self.adapter,
                                           strategy_state=self.strategy_state, global_rank=self.global_rank,
                                           noise=self._noise)
        self.adapter = new
        self.residual = gm.fold_residual(self.residual, result.base_delta, self.scaling)
        self.strategy_state = result.state
        if self.accountant is not None:
            self.accountant.step()
        out["strategy_metrics"] = dict(result.metrics)
        return out

    # ------------------------------------------------------------------ evaluation, persistence
    def record_eval(self, version: int, who: str, loss: float | None, tokens: int = 0,
                    error: str | None = None) -> None:
        """Stores the validation loss of global version ``version`` on ``who``'s set (a silo or ``held_out``)."""
        with self._lock:
            entry: dict[str, Any] = {"loss": loss, "tokens": int(tokens)}
            if error:
                entry["error"] = error
            self.evals.setdefault(str(version), {})[who] = entry

    def has_eval(self, version: int, who: str) -> bool:
        """Whether ``who`` already reported on ``version``."""
        with self._lock:
            return who in self.evals.get(str(version), {})

    def save(self) -> Path:
        """Checkpoints the completed rounds (see :mod:`.state`)."""
        with self._lock:
            return save_snapshot(self.state_dir, FederationSnapshot(
                round=self.round, adapter=self.adapter, adapter_config=self.adapter_config,
                residual=self.residual, strategy_state=self.strategy_state,
                dp_rounds=0 if self.accountant is None else self.accountant.rounds,
                history=self.history, evals=self.evals, config_hash=self.config_hash), self.strategy)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The servable PEFT adapter of the current global model (residual folded in exactly)."""
        with self._lock:
            return gm.export_peft(self.adapter, self.adapter_config, self.residual)
