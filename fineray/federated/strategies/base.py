"""Result type, strategy descriptor, registry and shared helpers of the aggregation strategies.

A strategy lives in one file of this package: its pure ``aggregate`` function (papers cited in the
docstring) and one :func:`register` call describing it (name, aliases, linearity, server- and client-side
options, how to checkpoint its server state). The package imports every module on first use, so a new
file is all it takes to add a strategy: config validation (:mod:`fineray.federated.config`) and the
checkpoints (:mod:`fineray.federated.state`) read everything from the :class:`AggregationStrategy` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fineray.federated._lora import (
    check_same_keys,
    extra_keys,
    lora_ranks,
    normalise_weights,
    weighted_mean,
)

__all__ = [
    "REGISTRY",
    "AggregateFn",
    "AggregateResult",
    "AggregationStrategy",
    "BaseDelta",
    "average_extras",
    "prepare",
    "register",
]

#: ``{module_prefix: (B_res, A_res)}`` with ``B_res`` (out, k) and ``A_res`` (k, in): a residual
#: ``B_res @ A_res`` that the caller folds into the frozen base weight (times the LoRA scaling).
#: Kept factored so that nothing here materialises a dense (out, in) matrix.
BaseDelta = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AggregateResult:
    """Output of one server aggregation.

    Attributes:
        adapter: New global adapter state dict (same keys as the updates).
        base_delta: Optional factored residual to add to the base weights, see :data:`BaseDelta`.
        reinit_adapter: True if silos must start the next round from a fresh adapter (``adapter``
            then holds such a fresh init: seeded ``A``, zero ``B``).
        state: Server-side optimiser state to pass into the next call (FedAdam/FedYogi), else None.
        metrics: Scalars worth logging (e.g. energy discarded by a truncation).
    """

    adapter: dict[str, torch.Tensor]
    base_delta: BaseDelta | None = None
    reinit_adapter: bool = False
    state: Any = None
    metrics: dict[str, float] = field(default_factory=dict)


class AggregateFn(Protocol):
    """``aggregate(updates, weights, **kw) -> AggregateResult``; pure (inputs are not mutated)."""

    def __call__(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any
    ) -> AggregateResult: ...


#: ``state -> (tensors, JSON-able metadata)`` and back: how a strategy's server state is checkpointed.
StateSaver = Callable[[Any], tuple[dict[str, torch.Tensor], dict[str, Any]]]
StateLoader = Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]


@dataclass(frozen=True)
class AggregationStrategy:
    """Registry entry of a federated aggregation algorithm (not train's ``Strategy``, which shards a model).

    Attributes:
        name: Registry name (``federated.strategy``).
        aggregate: The pure aggregation function (see :class:`AggregateFn`).
        linear: The result depends on the updates only through their weighted mean, i.e.
            ``aggregate(us, ws) == aggregate([mean(us, ws)], [1])``; such strategies may run under
            secure aggregation and DP (the server only ever sees one weighted mean).
        heterogeneous_rank: Silos may train adapters of different ranks.
        reinit_each_round: Silos restart from a fresh adapter every round.
        trains_a: False when the silos keep the LoRA ``A`` factors frozen (FFA-LoRA).
        options: Keyword options of ``aggregate`` a user may set in ``federated.strategy_options``.
        client_options: Options sent to the silos instead, with their defaults (FedProx's ``mu``).
        aliases: Other accepted names.
        paper: Citation (arXiv id).
        save_state: Turns the server state returned in :attr:`AggregateResult.state` into tensors and
            metadata for the round checkpoint; None for stateless strategies.
        load_state: The inverse of ``save_state``.
    """

    name: str
    aggregate: Callable[..., AggregateResult]
    linear: bool
    heterogeneous_rank: bool = False
    reinit_each_round: bool = False
    trains_a: bool = True
    options: frozenset[str] = frozenset()
    client_options: Mapping[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    paper: str = ""
    save_state: StateSaver | None = None
    load_state: StateLoader | None = None


#: Every registered strategy by name (filled as the package imports its modules).
REGISTRY: dict[str, AggregationStrategy] = {}


def register(strategy: AggregationStrategy) -> AggregationStrategy:
    """Adds ``strategy`` to :data:`REGISTRY` (called once at the bottom of its module).

    Raises:
        ValueError: Its name or an alias is already taken, or it can save a state but not load it.
    """
    taken = {n for s in REGISTRY.values() for n in (s.name, *s.aliases)}
    clash = sorted({strategy.name, *strategy.aliases} & taken)
    if clash:
        raise ValueError(f"federated strategy names already registered: {clash}")
    if (strategy.save_state is None) != (strategy.load_state is None):
        raise ValueError(f"strategy {strategy.name!r}: give both save_state and load_state, or neither")
    REGISTRY[strategy.name] = strategy
    return strategy


def prepare(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    same_rank: bool,
) -> tuple[list[float], dict[str, int]]:
    """Validates the inputs common to every strategy.

    Args:
        updates: Silo adapter state dicts.
        weights: Example counts (normalised here).
        same_rank: Require every silo to use the same rank per module.

    Returns:
        ``(probs, ranks_of_first_update)``.

    Raises:
        ValueError: On an empty/mismatched input, or on rank differences when ``same_rank``.
    """
    check_same_keys(updates)
    probs = normalise_weights(weights, len(updates))
    ranks = lora_ranks(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        other = lora_ranks(update)
        if same_rank and other != ranks:
            diff = {k: (ranks[k], other[k]) for k in ranks if ranks[k] != other[k]}
            raise ValueError(f"update {i} has different LoRA ranks (module: (r0, r{i})): {diff}")
    return probs, ranks


def average_extras(
    updates: Sequence[Mapping[str, torch.Tensor]], probs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of the non-LoRA tensors (plain FedAvg, as for any fully trained parameter)."""
    return {key: weighted_mean([u[key] for u in updates], probs) for key in extra_keys(updates[0])}
