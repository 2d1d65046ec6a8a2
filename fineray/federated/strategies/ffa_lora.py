"""FFA-LoRA: freeze A at a shared random init, train and average only B.

Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", arXiv 2403.12313.
Because every silo uses the *same* frozen ``A`` (derived from a shared seed with
:func:`init_frozen_a`), ``sum_i p_i B_i A = (sum_i p_i B_i) A``: averaging B is exact, and the
aggregation is linear (it also halves the trainable parameters and suits DP / secure aggregation).
Under secure aggregation only the B factors need to travel: rebuild the mean adapter with the
frozen A (a float or fixed-point mean of identical A's is not bit-identical and would be rejected).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fineray.federated._lora import lora_pairs, seeded_lora_a, weighted_mean
from fineray.federated.strategies.base import AggregateResult, average_extras, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate", "init_frozen_a"]


def init_frozen_a(
    shapes: Mapping[str, tuple[int, int]], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic frozen ``A`` factors shared by all silos.

    Args:
        shapes: ``{name: (r, in)}``; names are usually the ``lora_A`` keys or module prefixes.
        seed: Shared seed (e.g. from the federation config).
        dtype: Output dtype (values are drawn in float32, then cast).

    Returns:
        ``{name: A}`` with ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's default init bound); the same
        ``(shapes, seed)`` always gives bit-identical tensors, independently of dict order.
    """
    return {name: seeded_lora_a(tuple(shape), seed, name, dtype) for name, shape in shapes.items()}


def aggregate(
    updates: list[dict[str, torch.Tensor]],
    weights: list[float],
    *,
    global_adapter: Mapping[str, torch.Tensor] | None = None,
    **kw: Any,
) -> AggregateResult:
    """Averages the B factors; keeps the common frozen A.

    Args:
        updates: Silo adapter state dicts.
        weights: Example counts, normalised here.
        global_adapter: If given, each silo's A must also equal the global A.
        **kw: Ignored.

    Returns:
        Adapter with the shared A and the weighted-mean B (exact product average).

    Raises:
        ValueError: If the A factors are not bit-identical across silos (and the global adapter).
    """
    del kw
    probs, _ = prepare(updates, weights, same_rank=True)
    adapter = average_extras(updates, probs)
    for prefix, (a_key, b_key) in lora_pairs(updates[0]).items():
        a0 = updates[0][a_key]
        refs = [("global", global_adapter[a_key])] if global_adapter is not None else []
        refs += [(f"silo {i}", u[a_key]) for i, u in enumerate(updates)]
        for who, a in refs:
            if not torch.equal(a.to(device=a0.device), a0):
                raise ValueError(
                    f"FFA-LoRA needs a common frozen A, but {who}'s A of {prefix!r} differs from silo 0's"
                )
        adapter[a_key] = a0
        adapter[b_key] = weighted_mean([u[b_key] for u in updates], probs)
    return AggregateResult(adapter={k: adapter[k] for k in updates[0]})


STRATEGY = register(AggregationStrategy("ffa_lora", aggregate, linear=True, trains_a=False, aliases=("ffa",),
                                        paper="arXiv 2403.12313"))
