"""Shared fixtures for the federated maths tests (builders are fixtures: no cross-test imports)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

PREFIXES = (
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.0.self_attn.v_proj",
)

AdapterFactory = Callable[..., dict[str, torch.Tensor]]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_adapter(gen: torch.Generator) -> AdapterFactory:
    """``make_adapter(out=24, inp=16, r=4, dtype=float64)``: random two-module PEFT adapter."""

    def build(
        out: int = 24, inp: int = 16, r: int = 4, dtype: torch.dtype = torch.float64
    ) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for prefix in PREFIXES:
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, inp, generator=gen, dtype=dtype)
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=gen, dtype=dtype)
        return state

    return build


@pytest.fixture
def dense_sum() -> Callable[[list[dict[str, torch.Tensor]], list[float], str], torch.Tensor]:
    """``dense_sum(updates, weights, prefix)``: brute-force dense ``sum_i p_i B_i A_i``."""

    def compute(updates: list[dict[str, torch.Tensor]], weights: list[float], prefix: str) -> torch.Tensor:
        total = sum(weights)
        return sum(
            (w / total) * u[f"{prefix}.lora_B.weight"] @ u[f"{prefix}.lora_A.weight"]
            for u, w in zip(updates, weights, strict=True)
        )

    return compute
