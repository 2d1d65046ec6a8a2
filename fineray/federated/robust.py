"""Server-side screening of silo updates against the round's global adapter.

Pure checks, run before aggregation (and before secure aggregation on the silo side, since the
server cannot inspect masked vectors): non-finite values, missing/unexpected keys, wrong shapes
(rank changes tolerated for heterogeneous-rank strategies such as FLoRA/FlexLoRA) and an update
delta whose global L2 norm exceeds a bound (a cheap guard against diverged or poisoned silos).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fineray.federated._lora import lora_pairs

__all__ = ["validate_update"]


def _lora_roles(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: "A" | "B"}`` for LoRA factors; ``{}`` if the pairing itself is broken."""
    try:
        pairs = lora_pairs(state)
    except ValueError:
        return {}
    roles = {a: "A" for a, _ in pairs.values()}
    roles.update({b: "B" for _, b in pairs.values()})
    return roles


def _shape_ok(role: str | None, got: torch.Size, want: torch.Size, allow_rank_change: bool) -> bool:
    if got == want:
        return True
    if not allow_rank_change or role is None or len(got) != 2 or len(want) != 2:
        return False
    # A is (r, in): keep in; B is (out, r): keep out. The rank itself may differ.
    fixed = 1 if role == "A" else 0
    return got[fixed] == want[fixed] and got[1 - fixed] >= 1


def _aligned(global_t: torch.Tensor, shape: torch.Size, role: str | None) -> torch.Tensor:
    """The global tensor cut or zero-padded along the rank dimension to ``shape``."""
    if global_t.shape == shape or role is None:
        return global_t
    out = torch.zeros(shape, dtype=global_t.dtype, device=global_t.device)
    if role == "A":
        r = min(shape[0], global_t.shape[0])
        out[:r] = global_t[:r]
    else:
        r = min(shape[1], global_t.shape[1])
        out[:, :r] = global_t[:, :r]
    return out


def validate_update(
    update: Mapping[str, torch.Tensor],
    global_adapter: Mapping[str, torch.Tensor],
    *,
    allow_rank_change: bool = False,
    max_delta_norm: float | None = None,
) -> list[str]:
    """Reasons to reject one silo's adapter (empty list: accepted).

    Args:
        update: The silo's adapter after local training.
        global_adapter: The global adapter the round started from (defines keys and shapes).
        allow_rank_change: Accept LoRA factors whose rank differs from the global's (A keeps its
            ``in``, B its ``out``, and A/B of a module must agree on the rank).
        max_delta_norm: Bound on ``||update - global||_2`` over all tensors (global cut or
            zero-padded to the silo's rank); None disables the check.

    Returns:
        Human-readable reasons, in check order.
    """
    reasons: list[str] = []
    missing = sorted(set(global_adapter) - set(update))
    extra = sorted(set(update) - set(global_adapter))
    if missing:
        reasons.append(f"missing keys: {missing}")
    if extra:
        reasons.append(f"unexpected keys: {extra}")
    roles = _lora_roles(global_adapter)
    common = [k for k in global_adapter if k in update]
    shapes_ok = not missing and not extra
    for key in common:
        got, want = update[key].shape, global_adapter[key].shape
        if not _shape_ok(roles.get(key), got, want, allow_rank_change):
            reasons.append(f"shape of {key}: expected {tuple(want)}, got {tuple(got)}")
            shapes_ok = False
    if allow_rank_change and shapes_ok:
        for prefix, (a_key, b_key) in lora_pairs(global_adapter).items():
            if update[a_key].shape[0] != update[b_key].shape[1]:
                reasons.append(
                    f"rank of {prefix}: A has {update[a_key].shape[0]}, B has {update[b_key].shape[1]}"
                )
                shapes_ok = False
    for key in common:
        t = update[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            reasons.append(f"non-finite values in {key}")
    if max_delta_norm is not None and shapes_ok and not any(r.startswith("non-finite") for r in reasons):
        sq = 0.0
        for key in common:
            g = _aligned(global_adapter[key], update[key].shape, roles.get(key))
            diff = update[key].to(torch.float64) - g.to(device=update[key].device, dtype=torch.float64)
            sq += float(diff.pow(2).sum())
        norm = math.sqrt(sq)
        if norm > max_delta_norm:
            reasons.append(f"update delta norm {norm:.4g} exceeds bound {max_delta_norm:.4g}")
    return reasons
