"""FLoRA: stacking-based exact aggregation with heterogeneous ranks.

Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", arXiv 2409.05976.

The silo products are summed exactly by stacking their factors:

    B_stack = [p_1 B_1, ..., p_n B_n]   (out, sum_i r_i)
    A_stack = [A_1; ...; A_n]           (sum_i r_i, in)
    B_stack @ A_stack = sum_i p_i B_i A_i

Ranks may differ per silo. The whole product goes into ``base_delta`` (factored; the caller folds
``scaling * B_stack @ A_stack`` into the frozen weight) and every silo restarts the next round from
a fresh adapter (seeded ``A``, zero ``B``), returned in ``AggregateResult.adapter`` so that the
global model ``W0' + B A`` equals ``W0'``. Products are raw ``B @ A``; with heterogeneous ranks fold
each silo's ``alpha / r_i`` into its B first (:func:`fineray.federated._lora.scale_lora`).
Not linear: stacking needs every silo's factors.
"""

from __future__ import annotations

from typing import Any

import torch

from fineray.federated._lora import acc_dtype, fresh_adapter, lora_pairs
from fineray.federated.strategies.base import AggregateResult, BaseDelta, average_extras, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate"]


def aggregate(
    updates: list[dict[str, torch.Tensor]],
    weights: list[float],
    *,
    rank: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> AggregateResult:
    """Stacks the weighted factors into a base delta and re-initialises the adapter.

    Args:
        updates: Silo adapter state dicts (ranks may differ per silo).
        weights: Example counts, normalised here.
        rank: Rank of the fresh adapter; defaults to the largest silo rank per module (silos use
            :func:`~fineray.federated.strategies.flexlora.truncate_for_rank` to take theirs).
        seed: Seed of the fresh A (vary it per round, e.g. ``base_seed + round``).
        **kw: Ignored.

    Returns:
        Fresh adapter, ``base_delta[prefix] = (B_stack, A_stack)``, ``reinit_adapter=True``.
    """
    del kw
    probs, _ = prepare(updates, weights, same_rank=False)
    pairs = lora_pairs(updates[0])
    base_delta: BaseDelta = {}
    template = dict(updates[0])
    for prefix, (a_key, b_key) in pairs.items():
        dtype = acc_dtype(updates[0][b_key])
        b_stack = torch.cat([u[b_key].to(dtype) * p for u, p in zip(updates, probs, strict=True)], dim=1)
        a_stack = torch.cat([u[a_key] for u in updates], dim=0)
        base_delta[prefix] = (b_stack.to(updates[0][b_key].dtype), a_stack)
        # Template for the fresh adapter: the largest silo rank of this module.
        widest = max(updates, key=lambda u: u[a_key].shape[0])
        template[a_key], template[b_key] = widest[a_key], widest[b_key]
    adapter = fresh_adapter(template, seed=seed, rank=rank)
    adapter.update(average_extras(updates, probs))
    return AggregateResult(adapter=adapter, base_delta=base_delta, reinit_adapter=True)


STRATEGY = register(AggregationStrategy("flora", aggregate, linear=False, heterogeneous_rank=True,
                                        reinit_each_round=True, options=frozenset({"rank"}),
                                        paper="arXiv 2409.05976"))
