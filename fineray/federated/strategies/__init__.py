"""Server-side aggregation strategies for federated LoRA, and their registry.

Every strategy is a pure function ``aggregate(updates, weights, **kw) -> AggregateResult`` where
``updates`` are the silos' adapter state dicts after local training and ``weights`` their example
counts. Products are raw ``B @ A`` (LoRA scaling ``alpha / r`` is the caller's).

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
"""

from __future__ import annotations

from fineray.federated.strategies import (
    fedadam,
    fedavg,
    fedex_lora,
    fedprox,
    fedyogi,
    ffa_lora,
    flexlora,
    flora,
)
from fineray.federated.strategies.base import AggregateFn, AggregateResult, BaseDelta, Strategy

__all__ = [
    "STRATEGIES",
    "AggregateFn",
    "AggregateResult",
    "BaseDelta",
    "Strategy",
    "get_strategy",
]

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("fedavg", fedavg.aggregate, linear=True, paper="arXiv 1602.05629; FedIT arXiv 2305.05644"),
        Strategy("fedprox", fedprox.aggregate, linear=True, paper="arXiv 1812.06127"),
        Strategy("fedadam", fedadam.aggregate, linear=True, paper="arXiv 2003.00295"),
        Strategy("fedyogi", fedyogi.aggregate, linear=True, paper="arXiv 2003.00295"),
        Strategy("ffa_lora", ffa_lora.aggregate, linear=True, paper="arXiv 2403.12313"),
        Strategy("fedex_lora", fedex_lora.aggregate, linear=False, paper="arXiv 2410.09432"),
        Strategy(
            "flora",
            flora.aggregate,
            linear=False,
            heterogeneous_rank=True,
            reinit_each_round=True,
            paper="arXiv 2409.05976",
        ),
        Strategy(
            "flexlora", flexlora.aggregate, linear=False, heterogeneous_rank=True, paper="arXiv 2402.11505"
        ),
    )
}

_ALIASES = {"fedit": "fedavg", "ffa": "ffa_lora", "fedex": "fedex_lora"}


def get_strategy(name: str) -> Strategy:
    """Looks up a strategy by name (case-insensitive; ``-`` and ``_`` are interchangeable).

    Raises:
        KeyError: For an unknown name, listing the known ones.
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise KeyError(f"unknown federated strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[key]
