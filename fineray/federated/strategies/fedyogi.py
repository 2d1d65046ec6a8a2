"""FedYogi server aggregation (Reddi et al. 2021, arXiv 2003.00295); see :mod:`.fedopt`."""

from __future__ import annotations

from fineray.federated.strategies import fedopt

__all__ = ["STRATEGY", "aggregate"]

STRATEGY = fedopt.register_variant("fedyogi", "yogi")
aggregate = STRATEGY.aggregate
