"""The registry of aggregation strategies: what each strategy declares about itself.

A strategy lives in one file of this package: its pure ``aggregate`` function (papers cited in the
docstring) and one :func:`register` call describing it (name, aliases, linearity, server- and client-side
options, how to checkpoint its server state). The package imports every module on first use, so a new
file is all it takes to add a strategy: config validation (:mod:`fineray.federated.config`) and the
checkpoints (:mod:`fineray.federated.state`) read everything from the :class:`AggregationStrategy` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fineray.federated.strategies.base import AggregateResult

__all__ = ["REGISTRY", "AggregationStrategy", "get_strategy", "register"]

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


def get_strategy(name: str) -> AggregationStrategy:
    """Looks up a strategy by name or alias (case-insensitive; ``-`` and ``_`` are interchangeable).

    Raises:
        KeyError: For an unknown name, listing the known ones.
    """
    key = name.strip().lower().replace("-", "_")
    for strategy in REGISTRY.values():
        if key == strategy.name or key in strategy.aliases:
            return strategy
    raise KeyError(f"unknown federated strategy {name!r}; known: {sorted(REGISTRY)}")
