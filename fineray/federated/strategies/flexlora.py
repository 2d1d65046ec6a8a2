"""FlexLoRA: exact weighted sum of heterogeneous-rank products, re-factorised by SVD.

Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", arXiv 2402.11505.

The server forms ``Delta = sum_i p_i B_i A_i`` (ranks ``r_i`` may differ), takes its SVD and keeps
the top ``r_target`` components, split as ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``. Each silo
then receives that global truncated to its own rank (:func:`truncate_for_rank`); because components
are sorted by singular value, the first ``r`` of them form the best rank-``r`` approximation
(Eckart-Young) of the global product.

Never forms the dense (out, in) matrix: with ``R = sum_i r_i`` and the stacked factors
``B_stack = [p_1 B_1 ... p_n B_n]`` (out, R), ``A_stack = [A_1; ...; A_n]`` (R, in),

    B_stack = Q_B R_B,   A_stack^T = Q_A R_A       (reduced QR: O((out + in) R^2))
    R_B R_A^T = U S V^T                            (SVD of the small core: O(R^3))
    Delta = (Q_B U) S (Q_A V)^T

Computed in float64 (the core's small singular values matter for truncation), cast back at the
end. Products are raw ``B @ A``: fold each silo's ``alpha / r_i`` into its B beforehand
(:func:`fineray.federated._lora.scale_lora`) when ranks (hence scalings) differ.
Not linear: the products need every silo's factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fineray.federated._lora import lora_pairs
from fineray.federated.strategies.base import AggregateResult, BaseDelta, average_extras, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["STRATEGY", "aggregate", "factored_svd", "truncate_for_rank"]


def factored_svd(
    b_stack: torch.Tensor, a_stack: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``b_stack @ a_stack`` without forming the product.

    Args:
        b_stack: (out, R) left factor.
        a_stack: (R, in) right factor.

    Returns:
        ``(U, S, Vh)`` in float64 with ``U`` (out, k), ``S`` (k,) descending, ``Vh`` (k, in),
        ``k = min(out, in, R)``, such that ``U @ diag(S) @ Vh == b_stack @ a_stack``.
    """
    qb, rb = torch.linalg.qr(b_stack.to(torch.float64))  # (out, kb), (kb, R)
    qa, ra = torch.linalg.qr(a_stack.to(torch.float64).T)  # (in, ka), (ka, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (kb, ka)
    return qb @ u, s, vh @ qa.T


def aggregate(
    updates: list[dict[str, torch.Tensor]],
    weights: list[float],
    *,
    rank: int | None = None,
    keep_residual: bool = False,
    **kw: Any,
) -> AggregateResult:
    """Exact weighted product sum, truncated to ``rank`` and split ``sqrt(S)`` into both factors.

    Args:
        updates: Silo adapter state dicts (ranks may differ per silo).
        weights: Example counts, normalised here.
        rank: Target global rank; defaults to the largest silo rank per module. If the sum has
            fewer non-trivial components, the factors are zero-padded to ``rank``.
        keep_residual: Also return the discarded tail (components beyond ``rank``) as a factored
            ``base_delta``, making the round exact; the paper discards it (default).
        **kw: Ignored.

    Returns:
        Global adapter of rank ``rank``; ``metrics["flexlora_discarded_energy_max"]`` is the largest
        fraction ``sum(S_tail^2) / sum(S^2)`` dropped by the truncation over modules.
    """
    del kw
    probs, _ = prepare(updates, weights, same_rank=False)
    adapter = average_extras(updates, probs)
    base_delta: BaseDelta = {}
    discarded: list[float] = []
    for prefix, (a_key, b_key) in lora_pairs(updates[0]).items():
        a0, b0 = updates[0][a_key], updates[0][b_key]
        target = rank if rank is not None else max(int(u[a_key].shape[0]) for u in updates)
        if target < 1:
            raise ValueError(f"rank must be >= 1, got {target}")
        b_stack = torch.cat([u[b_key].to(torch.float64) * p for u, p in zip(updates, probs, strict=True)], 1)
        a_stack = torch.cat([u[a_key].to(torch.float64) for u in updates], dim=0)
        u_, s, vh = factored_svd(b_stack, a_stack)
        k = min(target, s.numel())
        root = s.sqrt()
        b_new = torch.zeros((b0.shape[0], target), dtype=torch.float64, device=b0.device)
        a_new = torch.zeros((target, a0.shape[1]), dtype=torch.float64, device=a0.device)
        b_new[:, :k] = u_[:, :k] * root[:k]
        a_new[:k] = root[:k, None] * vh[:k]
        adapter[a_key], adapter[b_key] = a_new.to(a0.dtype), b_new.to(b0.dtype)
        energy = float((s**2).sum())
        discarded.append(float((s[k:] ** 2).sum()) / energy if energy > 0 else 0.0)
        if keep_residual and k < s.numel():
            base_delta[prefix] = (
                (u_[:, k:] * root[k:]).to(b0.dtype),
                (root[k:, None] * vh[k:]).to(a0.dtype),
            )
    return AggregateResult(
        adapter={key: adapter[key] for key in updates[0]},
        base_delta=base_delta if keep_residual else None,
        metrics={"flexlora_discarded_energy_max": max(discarded, default=0.0)},
    )


def truncate_for_rank(global_adapter: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The global adapter cut to rank ``r``: first ``r`` rows of each A and columns of each B.

    For a FlexLoRA global (components sorted by singular value) this is the best rank-``r``
    approximation of every module's product. Non-LoRA keys are returned unchanged.

    Raises:
        ValueError: If ``r < 1`` or ``r`` exceeds a module's global rank.
    """
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    out = dict(global_adapter)
    for prefix, (a_key, b_key) in lora_pairs(global_adapter).items():
        have = int(global_adapter[a_key].shape[0])
        if r > have:
            raise ValueError(f"cannot truncate module {prefix!r} of rank {have} to rank {r}")
        out[a_key] = global_adapter[a_key][:r].clone()
        out[b_key] = global_adapter[b_key][:, :r].clone()
    return out


STRATEGY = register(AggregationStrategy("flexlora", aggregate, linear=False, heterogeneous_rank=True,
                                        options=frozenset({"rank", "keep_residual"}), paper="arXiv 2402.11505"))
