"""What the coordinator does with a round's contributions: the round's collected state, screening a plain
update on arrival, decoding the secure-aggregation sum, and aggregating into the next global adapter.

Functions of their inputs: :class:`~fineray.federated.federation.Federation` holds the state, the lock and
the checkpoints, and applies what :func:`aggregate_round` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fineray.federated import global_model as gm
from fineray.federated._lora import flatten, lora_pairs, unflatten
from fineray.federated._secagg_round import SecAggRound
from fineray.federated.config import FederatedConfig
from fineray.federated.dp import add_noise, private_mean, secure_generator, update_norm
from fineray.federated.robust import validate_update
from fineray.federated.strategies import AggregateResult, AggregationStrategy
from fineray.federated.wire import WireError, unpack_tensors

__all__ = ["RoundState", "aggregate_round", "round_row", "screen_update", "trainable_keys", "unmask_mean"]


def trainable_keys(adapter: dict[str, torch.Tensor], fcfg: FederatedConfig) -> list[str]:
    """Keys the silos change: every key, except FFA-LoRA's frozen ``A`` factors."""
    if fcfg.trains_a:
        return sorted(adapter)
    frozen = {a for a, _ in lora_pairs(adapter).values()}
    return sorted(k for k in adapter if k not in frozen)


@dataclass
class RoundState:
    """The round being trained (not checkpointed: a restarted coordinator re-opens it).

    ``phase`` is ``train`` (plain updates, or public keys under secure aggregation), then the secure
    aggregation phases of ``secagg`` (``share``, ``mask``, ``unmask``).
    """

    round: int
    participants: list[str]
    planned: int
    opened_at: float
    deadline: float
    phase: str = "train"
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    responded: dict[str, str] = field(default_factory=dict)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    secagg: SecAggRound | None = None


def screen_update(blob: bytes, adapter: dict[str, torch.Tensor], adapter_config: dict[str, Any],
                  global_rank: int, fcfg: FederatedConfig,
                  heterogeneous_rank: bool) -> tuple[list[str], dict[str, Any]]:
    """Checks a plain update against the global ``adapter`` before it may count.

    Args:
        blob: The safetensors body, with metadata ``{num_examples, metrics}``.
        adapter: The global adapter (at ``global_rank``).
        adapter_config: Its PEFT config.
        global_rank: The global LoRA rank; a silo's factors are brought to it first.
        fcfg: The federated section (``max_update_norm``, whether ``A`` is trained).
        heterogeneous_rank: Whether the strategy accepts factors whose rank changed.

    Returns:
        ``(reasons, entry)``: why the update is refused (empty when it is accepted), and
        ``{tensors, num_examples, metrics}`` (empty when the body could not be read).
    """
    try:
        tensors, meta = unpack_tensors(blob)
    except WireError as e:
        return [f"malformed update: {e}"], {}
    n = meta.get("num_examples")
    if not isinstance(n, int) or n < 1:
        return [f"num_examples must be a positive integer, got {n!r}"], {}
    try:
        tensors = gm.from_silo_rank(tensors, adapter_config, global_rank)
    except (ValueError, KeyError) as e:
        return [f"bad LoRA factors: {e}"], {}
    reasons = validate_update(tensors, adapter, allow_rank_change=heterogeneous_rank,
                              max_delta_norm=fcfg.max_update_norm)
    if not reasons and not fcfg.trains_a:
        for a_key, _ in lora_pairs(adapter).values():
            if not torch.equal(tensors[a_key], adapter[a_key]):
                reasons.append(f"FFA-LoRA keeps A frozen, but {a_key} changed")
                break
    return reasons, {"tensors": tensors, "num_examples": n, "metrics": dict(meta.get("metrics") or {})}


def round_row(cur: RoundState, now: float, epsilon: float | None) -> tuple[list[str], dict[str, Any]]:
    """The silos whose contributions arrived, and the closing round's history row so far.

    The row reports participants, rejections (by silo), stragglers (no answer), silos dropped during
    secure aggregation (sent keys, never a masked vector: the round went on without them), the wall time
    since the round opened (``now`` on the round's clock), the mean ``train_loss`` and the example count of
    what arrived; ``accepted`` stays empty until aggregation succeeds.
    """
    sa = cur.secagg
    contributed = sorted(sa.masked if sa else cur.updates)
    late = [s for s in cur.participants if s not in cur.responded]
    row: dict[str, Any] = {
        "round": cur.round, "participants": cur.participants, "accepted": [], "rejected": {}, "stragglers": late,
        "dropped": sa.dropped if sa else [], "wall_s": round(now - cur.opened_at, 3), "epsilon": epsilon}
    for silo, reason in cur.rejections:
        row["rejected"].setdefault(silo, []).append(reason)
    meta = {s: (sa.meta if sa else cur.updates)[s] for s in contributed}
    losses = [m["metrics"].get("train_loss") for m in meta.values()]
    losses = [x for x in losses if isinstance(x, (int, float)) and math.isfinite(x)]
    row["train_loss"] = sum(losses) / len(losses) if losses else None
    row["num_examples"] = sum(int(m["num_examples"]) for m in meta.values())
    return contributed, row


def unmask_mean(cur: RoundState, fcfg: FederatedConfig, adapter: dict[str, torch.Tensor],
                noise: torch.Generator | None) -> dict[str, torch.Tensor]:
    """The mean delta of the trainable keys, decoded from the survivors' masked vectors.

    Under DP the sum is divided by the planned participant count and noised (``noise``, default a
    generator seeded from ``os.urandom``); otherwise it is divided by the decoded total weight, i.e. the
    survivors' (a dropped silo's weight is not in the sum).
    """
    keys = trainable_keys(adapter, fcfg)
    _, spec = flatten({k: adapter[k] for k in keys})
    assert cur.secagg is not None
    total, weight = cur.secagg.decode(cur.round)
    if fcfg.dp.enabled:  # fixed denominator: the planned participant count (DP-FedAvg)
        mean = unflatten(total / cur.planned, spec)
        return add_noise(mean, fcfg.dp.clip_norm, fcfg.dp.noise_multiplier, cur.planned,
                         noise or secure_generator())
    if weight <= 0:
        raise ValueError("secure aggregation decoded a zero total weight")
    return unflatten(total / weight, spec)


def aggregate_round(
    cur: RoundState, contributed: list[str], mean_delta: dict[str, torch.Tensor] | None, *,
    strategy: AggregationStrategy, fcfg: FederatedConfig, adapter: dict[str, torch.Tensor], strategy_state: Any,
    global_rank: int, noise: torch.Generator | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], AggregateResult]:
    """Runs the strategy on the round's contributions.

    Args:
        cur: The round; its plain updates are read when ``mean_delta`` is None.
        contributed: The silos whose contributions count.
        mean_delta: The decoded secure-aggregation mean, or None for plain updates (DP clips and noises them).
        strategy: The aggregation strategy.
        fcfg: The federated section.
        adapter: The current global adapter.
        strategy_state: The strategy's state from the previous round.
        global_rank: The global LoRA rank.
        noise: DP noise source (default: a generator seeded from ``os.urandom``).

    Returns:
        ``(row, new_adapter, result)``: the history-row fields (``update_norms``), the next global adapter in
        the current dtypes, and the strategy's result (base residual, state, metrics).

    Raises:
        ValueError: The aggregate has non-finite values (or the strategy refused its inputs).
    """
    f, g = fcfg, adapter
    out: dict[str, Any] = {}
    kw: dict[str, Any] = {"global_adapter": g, "state": strategy_state, "seed": f.seed + cur.round,
                          "rank": global_rank, **f.server_options()}
    keys = trainable_keys(g, f)
    if mean_delta is None and f.dp.enabled:
        deltas = [{k: cur.updates[s]["tensors"][k].float() - g[k].float() for k in keys} for s in contributed]
        mean_delta, norms = private_mean(deltas, f.dp.clip_norm, f.dp.noise_multiplier,
                                         noise or secure_generator(), denominator=cur.planned)
        out["update_norms"] = dict(zip(contributed, norms, strict=True))
    if mean_delta is not None:
        mean = dict(g)
        for k in keys:
            mean[k] = (g[k].to(torch.float64) + mean_delta[k].to(torch.float64)).to(g[k].dtype)
        result = strategy.aggregate([mean], [1.0], **kw)
    else:
        updates = [cur.updates[s]["tensors"] for s in contributed]
        out["update_norms"] = {s: update_norm({k: u[k].float() - g[k].float() for k in keys
                                               if u[k].shape == g[k].shape})
                               for s, u in zip(contributed, updates, strict=True)}
        result = strategy.aggregate(updates, [cur.updates[s]["num_examples"] for s in contributed], **kw)
    new = {k: result.adapter[k].to(g[k].dtype) for k in g}
    bad = sorted(k for k, t in new.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"aggregate has non-finite values in {bad[:3]}")
    return out, new, result
