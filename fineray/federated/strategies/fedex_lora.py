"""FedEx-LoRA: FedAvg of the factors plus an exact residual folded into the base weight.

Singhal et al. 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", arXiv 2410.09432.

The global adapter is the usual ``(B_bar, A_bar) = (sum_i p_i B_i, sum_i p_i A_i)``; the error of
that naive product is the residual

    Delta_res = sum_i p_i B_i A_i - B_bar A_bar = B_res @ A_res,
    B_res = [p_1 B_1, ..., p_n B_n, -B_bar]      (out, (n+1) r)
    A_res = [A_1; ...; A_n; A_bar]               ((n+1) r, in)

returned in factored form in ``AggregateResult.base_delta``; the caller adds
``scaling * B_res @ A_res`` to the frozen base weight (one dense GEMM into a tensor that is dense
anyway). Then ``W0 + s (B_bar A_bar + B_res A_res) = W0 + s sum_i p_i B_i A_i`` exactly.
Products are raw ``B @ A`` (no ``alpha / r``). Not linear: the residual needs every silo's factors.
"""

from __future__ import annotations

from typing import Any

import torch

from fineray.federated._lora import acc_dtype, lora_pairs, weighted_mean
from fineray.federated.strategies.base import AggregateResult, BaseDelta, average_extras, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate"]


def aggregate(updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any) -> AggregateResult:
    """Averages A and B and returns the exact factored residual.

    Args:
        updates: Silo adapter state dicts (same ranks).
        weights: Example counts, normalised here.
        **kw: Ignored.

    Returns:
        Averaged adapter and ``base_delta[prefix] = (B_res, A_res)`` in the adapter dtype.
    """
    del kw
    probs, _ = prepare(updates, weights, same_rank=True)
    adapter = average_extras(updates, probs)
    base_delta: BaseDelta = {}
    for prefix, (a_key, b_key) in lora_pairs(updates[0]).items():
        a_bar = weighted_mean([u[a_key] for u in updates], probs)
        b_bar = weighted_mean([u[b_key] for u in updates], probs)
        adapter[a_key], adapter[b_key] = a_bar, b_bar
        dtype = acc_dtype(b_bar)
        # Scale in the accumulation dtype so that bf16 silos do not round p_i * B_i twice.
        b_parts = [u[b_key].to(dtype) * p for u, p in zip(updates, probs, strict=True)]
        b_res = torch.cat([*b_parts, -b_bar.to(dtype)], dim=1).to(b_bar.dtype)
        a_res = torch.cat([*(u[a_key] for u in updates), a_bar], dim=0)
        base_delta[prefix] = (b_res, a_res)
    return AggregateResult(adapter={k: adapter[k] for k in updates[0]}, base_delta=base_delta)


STRATEGY = register(AggregationStrategy("fedex_lora", aggregate, linear=False, aliases=("fedex",),
                                        paper="arXiv 2410.09432"))
