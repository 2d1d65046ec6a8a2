"""Server-side aggregation strategies for federated LoRA, discovered from this package's modules.

Every strategy is a pure function ``aggregate(updates, weights, **kw) -> AggregateResult`` where
``updates`` are the silos' adapter state dicts after local training and ``weights`` their example
counts (Flower's ``strategy/`` + ``aggregate.py`` split, one file per algorithm). Products are raw
``B @ A`` (LoRA scaling ``alpha / r`` is the caller's).

=============  ======  ==========  ==================================================
name           linear  het. ranks  idea
=============  ======  ==========  ==================================================
fedavg         yes     no          average A and B separately (inexact baseline)
fedprox        yes     no          FedAvg on the server + client proximal term
fedadam        yes     no          Adam on the pseudo-gradient (server state)
fedyogi        yes     no          Yogi on the pseudo-gradient (server state)
ffa_lora       yes     no          frozen shared A, average B (exact)
fedex_lora     no      no          FedAvg + factored residual into the base (exact)
flora          no      yes         stack factors into the base, re-init (exact)
flexlora       no      yes         SVD of the exact sum, truncate per silo rank
=============  ======  ==========  ==================================================

``linear`` strategies may run under secure aggregation: feed them the single unmasked weighted
mean, ``aggregate([mean], [1.0], **kw)``.

Adding a strategy is one file here: its ``aggregate`` and a
:func:`~fineray.federated.strategies.base.register` call (see :class:`AggregationStrategy` for what
the entry declares). Modules whose names start with ``_`` and ``base`` are helpers, not strategies.
"""

from __future__ import annotations

import importlib
import pkgutil

from fineray.federated.strategies.base import (
    REGISTRY,
    AggregateFn,
    AggregateResult,
    AggregationStrategy,
    BaseDelta,
)

__all__ = [
    "STRATEGIES",
    "AggregateFn",
    "AggregateResult",
    "AggregationStrategy",
    "BaseDelta",
    "get_strategy",
]

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

#: ``{name: AggregationStrategy}`` of every strategy module in this package.
STRATEGIES = REGISTRY


def get_strategy(name: str) -> AggregationStrategy:
    """Looks up a strategy by name or alias (case-insensitive; ``-`` and ``_`` are interchangeable).

    Raises:
        KeyError: For an unknown name, listing the known ones.
    """
    key = name.strip().lower().replace("-", "_")
    for strategy in STRATEGIES.values():
        if key == strategy.name or key in strategy.aliases:
            return strategy
    raise KeyError(f"unknown federated strategy {name!r}; known: {sorted(STRATEGIES)}")
