"""FedAdam server aggregation (Reddi et al. 2021, arXiv 2003.00295); see :mod:`.fedopt`."""

from __future__ import annotations

from typing import Any

import torch

from fineray.federated.strategies import fedopt
from fineray.federated.strategies.base import AggregateResult
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate"]


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any) -> AggregateResult:
    """FedAdam step; keyword arguments as :func:`fedopt.aggregate` (``global_adapter`` required)."""
    kw.pop("optimizer", None)
    return fedopt.aggregate(updates, weights, optimizer="adam", **kw)


STRATEGY = register(AggregationStrategy("fedadam", aggregate, linear=True, options=fedopt.OPTIONS,
                                        save_state=fedopt.save_state, load_state=fedopt.load_state,
                                        paper="arXiv 2003.00295"))
