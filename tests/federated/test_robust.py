"""Screening of silo updates: NaN/Inf, keys, shapes, heterogeneous ranks, delta-norm bound."""

from __future__ import annotations

import torch

from fineray.federated.robust import validate_update

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
A = f"{PREFIX}.lora_A.weight"
B = f"{PREFIX}.lora_B.weight"


def screen_updates(updates, glob, **kwargs) -> list[tuple]:
    """(silo, reason) of every silo's update, as the coordinator screens a round."""
    items = updates.items() if isinstance(updates, dict) else enumerate(updates)
    return [(silo, reason) for silo, update in items for reason in validate_update(update, glob, **kwargs)]


def _adapter(r: int = 4, fill: float = 0.0) -> dict[str, torch.Tensor]:
    return {A: torch.full((r, 16), fill), B: torch.full((24, r), fill)}


def test_good_update_is_accepted():
    # Prepare
    glob = _adapter()
    # Execute
    rejections = screen_updates({"silo-a": _adapter(fill=0.01)}, glob, max_delta_norm=10.0)
    # Assert
    assert rejections == []


def test_rejects_nan_wrong_shape_missing_key_and_large_norm():
    # Prepare
    glob = _adapter()
    nan = _adapter()
    nan[B][3, 1] = float("nan")
    wrong_shape = {A: torch.zeros(4, 15), B: torch.zeros(24, 4)}
    missing = {A: torch.zeros(4, 16)}
    too_big = _adapter(fill=1.0)  # delta norm sqrt(4*16 + 24*4) = sqrt(160) ~ 12.6
    # Execute
    rejections = screen_updates(
        {"nan": nan, "shape": wrong_shape, "missing": missing, "big": too_big, "ok": _adapter()},
        glob,
        max_delta_norm=10.0,
    )
    # Assert
    by_silo = dict(rejections)
    assert set(by_silo) == {"nan", "shape", "missing", "big"}
    assert f"non-finite values in {B}" == by_silo["nan"]
    assert by_silo["shape"] == f"shape of {A}: expected (4, 16), got (4, 15)"
    assert by_silo["missing"] == f"missing keys: ['{B}']"
    assert by_silo["big"] == "update delta norm 12.65 exceeds bound 10"


def test_extra_key_and_inf_reported_for_list_input():
    # Prepare
    glob = _adapter()
    extra = _adapter() | {"rogue.weight": torch.zeros(1)}
    inf = _adapter()
    inf[A][0, 0] = float("inf")
    # Execute
    rejections = screen_updates([extra, inf], glob)
    # Assert
    assert rejections == [(0, "unexpected keys: ['rogue.weight']"), (1, f"non-finite values in {A}")]


def test_rank_change_only_allowed_for_heterogeneous_strategies():
    # Prepare
    glob = _adapter(r=8)
    rank2 = _adapter(r=2, fill=0.5)
    inconsistent = {A: torch.zeros(2, 16), B: torch.zeros(24, 3)}
    # Execute
    strict = validate_update(rank2, glob)
    relaxed = validate_update(rank2, glob, allow_rank_change=True, max_delta_norm=100.0)
    bounded = validate_update(rank2, glob, allow_rank_change=True, max_delta_norm=1.0)
    broken = validate_update(inconsistent, glob, allow_rank_change=True)
    # Assert
    assert strict == [
        f"shape of {A}: expected (8, 16), got (2, 16)",
        f"shape of {B}: expected (24, 8), got (24, 2)",
    ]
    assert relaxed == []
    # Delta against the global cut to rank 2: 0.5 * sqrt(2*16 + 24*2) = 0.5 * sqrt(80) ~ 4.472.
    assert bounded == ["update delta norm 4.472 exceeds bound 1"]
    assert broken == [f"rank of {PREFIX}: A has 2, B has 3"]
