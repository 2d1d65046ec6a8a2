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

Adding a strategy is one file here: its ``aggregate`` and a :func:`~.registry.register` call (see
:class:`~.registry.AggregationStrategy` for what the entry declares). Every module of the package is imported
on first use (except ``_``-prefixed ones); those that register are the strategies, the others helpers.
"""

from __future__ import annotations

import importlib
import pkgutil

from fineray.federated.strategies.base import AggregateFn, AggregateResult, BaseDelta
from fineray.federated.strategies.registry import REGISTRY, AggregationStrategy, get_strategy

__all__ = [
    "STRATEGIES",
    "AggregateFn",
    "AggregateResult",
    "AggregationStrategy",
    "BaseDelta",
    "get_strategy",
]

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

#: ``{name: AggregationStrategy}`` of every strategy module in this package.
STRATEGIES = REGISTRY

