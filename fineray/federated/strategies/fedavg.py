"""FedAvg / FedIT aggregation of LoRA adapters: average A and B separately.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", arXiv 1602.05629; applied to LoRA instruction tuning as FedIT (Zhang et al. 2023,
"Towards Building the Federated GPT: Federated Instruction Tuning", arXiv 2305.05644).

This is the naive baseline and it is NOT exact: ``mean(B) @ mean(A) != mean(B @ A)``. With two
equally weighted silos ``B1=2, A1=0`` and ``B2=0, A2=2`` every local product is 0 but the
averaged product is ``1 * 1 = 1``. See FedEx-LoRA / FLoRA / FlexLoRA / FFA-LoRA for exact variants.
"""

from __future__ import annotations

from typing import Any

import torch

from fineray.federated._lora import weighted_mean
from fineray.federated.strategies.base import AggregateResult, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate"]


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any) -> AggregateResult:
    """Example-weighted average of every tensor (A and B factors separately).

    Args:
        updates: Silo adapter state dicts (same keys and shapes).
        weights: Example counts per silo, normalised here.
        **kw: Ignored (accepted so that all strategies share one call signature).

    Returns:
        The averaged adapter; no base delta, no re-initialisation.
    """
    del kw
    probs, _ = prepare(updates, weights, same_rank=True)
    adapter = {key: weighted_mean([u[key] for u in updates], probs) for key in updates[0]}
    return AggregateResult(adapter=adapter)


STRATEGY = register(AggregationStrategy("fedavg", aggregate, linear=True, aliases=("fedit",),
                                        paper="arXiv 1602.05629; FedIT arXiv 2305.05644"))
