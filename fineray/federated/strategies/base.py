"""Result type and shared helpers of the aggregation strategies (their registry: :mod:`.registry`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fineray.federated._lora import (
    check_same_keys,
    extra_keys,
    lora_ranks,
    normalise_weights,
    weighted_mean,
)

__all__ = [
    "AggregateFn",
    "AggregateResult",
    "BaseDelta",
    "average_extras",
    "prepare",
]

#: ``{module_prefix: (B_res, A_res)}`` with ``B_res`` (out, k) and ``A_res`` (k, in): a residual
#: ``B_res @ A_res`` that the caller folds into the frozen base weight (times the LoRA scaling).
#: Kept factored so that nothing here materialises a dense (out, in) matrix.
BaseDelta = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AggregateResult:
    """Output of one server aggregation.

    Attributes:
        adapter: New global adapter state dict (same keys as the updates).
        base_delta: Optional factored residual to add to the base weights, see :data:`BaseDelta`.
        reinit_adapter: True if silos must start the next round from a fresh adapter (``adapter``
            then holds such a fresh init: seeded ``A``, zero ``B``).
        state: Server-side optimiser state to pass into the next call (FedAdam/FedYogi), else None.
        metrics: Scalars worth logging (e.g. energy discarded by a truncation).
    """

    adapter: dict[str, torch.Tensor]
    base_delta: BaseDelta | None = None
    reinit_adapter: bool = False
    state: Any = None
    metrics: dict[str, float] = field(default_factory=dict)


class AggregateFn(Protocol):
    """``aggregate(updates, weights, **kw) -> AggregateResult``; pure (inputs are not mutated)."""

    def __call__(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any
    ) -> AggregateResult: ...


def prepare(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    same_rank: bool,
) -> tuple[list[float], dict[str, int]]:
    """Validates the inputs common to every strategy.

    Args:
        updates: Silo adapter state dicts.
        weights: Example counts (normalised here).
        same_rank: Require every silo to use the same rank per module.

    Returns:
        ``(probs, ranks_of_first_update)``.

    Raises:
        ValueError: On an empty/mismatched input, or on rank differences when ``same_rank``.
    """
    check_same_keys(updates)
    probs = normalise_weights(weights, len(updates))
    ranks = lora_ranks(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        other = lora_ranks(update)
        if same_rank and other != ranks:
            diff = {k: (ranks[k], other[k]) for k in ranks if ranks[k] != other[k]}
            raise ValueError(f"update {i} has different LoRA ranks (module: (r0, r{i})): {diff}")
    return probs, ranks


def average_extras(
    updates: Sequence[Mapping[str, torch.Tensor]], probs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of the non-LoRA tensors (plain FedAvg, as for any fully trained parameter)."""
    return {key: weighted_mean([u[key] for u in updates], probs) for key in extra_keys(updates[0])}
