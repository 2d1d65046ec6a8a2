"""FedProx: FedAvg on the server plus a proximal term in the client loss.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv 1812.06127.
The server step is identical to FedAvg (:mod:`fineray.federated.strategies.fedavg`); the
algorithmic difference lives in the client objective ``F_k(w) + mu/2 * ||w - w_global||^2``,
whose second term :func:`proximal_term` computes over the trainable (LoRA) parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fineray.federated.strategies import fedavg
from fineray.federated.strategies.base import AggregateResult
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate", "proximal_term"]


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any) -> AggregateResult:
    """Server aggregation of FedProx, which is FedAvg (see :func:`fedavg.aggregate`)."""
    return fedavg.aggregate(updates, weights, **kw)


def proximal_term(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx proximal penalty ``mu / 2 * sum_k ||w_k - w_global_k||^2``.

    Args:
        params: Current local trainable parameters (gradients flow through these).
        global_params: The round's starting global parameters; treated as constants. Its keys
            select which parameters are penalised; ``params`` must contain them all.
        mu: Proximal coefficient (>= 0); ``mu = 0`` recovers FedAvg.

    Returns:
        A scalar tensor (float32 or float64) on the device of the first parameter.

    Raises:
        ValueError: If ``mu < 0`` or ``global_params`` is empty.
        KeyError: If a global key is missing from ``params``.
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if not global_params:
        raise ValueError("global_params is empty")
    total: torch.Tensor | None = None
    for key, g in global_params.items():
        w = params[key]
        # Accumulate in >= float32 so bf16 params do not lose the small differences.
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        diff = w.to(dtype) - g.detach().to(device=w.device, dtype=dtype)
        sq = diff.pow(2).sum()
        total = sq if total is None else total + sq.to(total.device)
    assert total is not None
    return 0.5 * mu * total


#: ``mu`` (default 0.01) travels to the silos, which add the proximal gradient ``mu (w - w_global)``.
STRATEGY = register(AggregationStrategy("fedprox", aggregate, linear=True, client_options={"mu": 0.01},
                                        paper="arXiv 1812.06127"))
