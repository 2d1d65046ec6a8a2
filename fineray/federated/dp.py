"""User(silo)-level differential privacy for federated rounds: DP-FedAvg.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
arXiv 1710.06963. Each participating silo's update *delta* (local adapter minus the round's global
adapter) is clipped to L2 norm ``C`` over all tensors jointly; the server averages the clipped
deltas with uniform weights over the ``m`` participants (example-count weighting would let one silo
dominate the sensitivity) and adds Gaussian noise of std ``z * C / m`` to the average, i.e. noise
``N(0, (zC)^2)`` on the sum whose L2 sensitivity is ``C``.

The privacy cost is tracked with the RDP accountant of ``dp_accounting``: each round is a
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with ``q`` the per-round silo sampling rate
(``q = 1`` when every silo joins every round), composed over rounds. With Poisson sampling the
paper's fixed-denominator estimator divides by the *expected* count ``q * N``; pass that as ``m``.

Noise must come from an unpredictable generator in production (:func:`secure_generator`); tests
pass a seeded one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from dp_accounting import dp_event, rdp

__all__ = [
    "DPAccountant",
    "add_noise",
    "clip_update",
    "private_mean",
    "secure_generator",
    "update_norm",
]


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from ``os.urandom`` (not reproducible by design)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of ``delta`` (computed in float64)."""
    total = sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in delta.values())
    return math.sqrt(total)


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scales ``delta`` by ``min(1, C / ||delta||)`` so that its global L2 norm is at most ``C``.

    Args:
        delta: Update delta (local minus global), any float dtypes.
        clip_norm: ``C > 0``.

    Returns:
        ``(clipped_delta, norm_before_clipping)``; inputs are not mutated.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * factor for k, t in delta.items()}, norm


def add_noise(
    avg: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    num_silos: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Adds i.i.d. ``N(0, (z * C / m)^2)`` to every element of the averaged clipped delta.

    Args:
        avg: Uniform mean of the ``m`` clipped deltas.
        clip_norm: ``C`` used for clipping.
        noise_multiplier: ``z`` (the accountant's ``GaussianDpEvent`` parameter).
        num_silos: ``m``, the denominator of the mean (participants, or ``q * N`` expected).
        generator: Noise source; its device is where the noise is drawn (float32).

    Returns:
        New dict with noise added, in the dtypes/devices of ``avg``.
    """
    if noise_multiplier < 0 or clip_norm <= 0 or num_silos <= 0:
        raise ValueError(f"need z >= 0, C > 0, m > 0; got z={noise_multiplier} C={clip_norm} m={num_silos}")
    std = noise_multiplier * clip_norm / num_silos
    out: dict[str, torch.Tensor] = {}
    for key, t in avg.items():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=generator.device)
        out[key] = (t.to(torch.float32) + std * noise.to(t.device)).to(t.dtype)
    return out


def private_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    denominator: float | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """DP-FedAvg server step: clip each delta, uniform mean, Gaussian noise.

    Args:
        deltas: One update delta per participating silo (same keys/shapes).
        clip_norm: ``C``.
        noise_multiplier: ``z``.
        generator: Noise source (see :func:`secure_generator`).
        denominator: ``m``; defaults to ``len(deltas)`` (use ``q * N`` for the fixed-denominator
            estimator under Poisson sampling).

    Returns:
        ``(noisy_mean_delta, pre_clip_norms)``; add the mean to the global adapter.
    """
    if not deltas:
        raise ValueError("need at least one delta")
    m = float(len(deltas) if denominator is None else denominator)
    clipped = []
    norms = []
    for delta in deltas:
        c, n = clip_update(delta, clip_norm)
        clipped.append(c)
        norms.append(n)
    total = {k: sum(c[k].to(torch.float32) for c in clipped) / m for k in clipped[0]}
    mean = {k: v.to(clipped[0][k].dtype) for k, v in total.items()}
    return add_noise(mean, clip_norm, noise_multiplier, m, generator), norms


class DPAccountant:
    """RDP accountant of DP-FedAvg rounds; ``step()`` returns epsilon at ``delta`` so far.

    One round is ``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))``. RDP
    composes additively over rounds, so the per-round RDP curve is computed once by
    ``dp_accounting.rdp.RdpAccountant`` (the costly part, ~0.1 s) and scaled by the round count;
    :attr:`event` gives the equivalent composed ``DpEvent`` for audit.

    Args:
        noise_multiplier: ``z`` (> 0).
        sample_rate: Per-round probability ``q`` that a silo participates, in (0, 1].
        delta: Target delta in (0, 1), conventionally below ``1 / N`` for ``N`` silos.
        orders: RDP orders; defaults to ``dp_accounting``'s.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        orders: Sequence[float] | None = None,
    ) -> None:
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self._round_event = dp_event.PoissonSampledDpEvent(
            sample_rate, dp_event.GaussianDpEvent(noise_multiplier)
        )
        unit = rdp.RdpAccountant(orders)
        unit.compose(self._round_event)
        self._orders: np.ndarray = unit.orders
        self._unit_rdp: np.ndarray = unit.rdp
        self.rounds = 0
        self.epsilon = 0.0

    @property
    def event(self) -> dp_event.DpEvent:
        """All rounds so far as one ``SelfComposedDpEvent``."""
        return dp_event.SelfComposedDpEvent(self._round_event, self.rounds)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (does not change the state)."""
        if rounds <= 0:
            return 0.0
        eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(self._orders, self._unit_rdp * rounds, self.delta)
        return float(eps)

    def step(self, rounds: int = 1) -> float:
        """Records ``rounds`` more rounds and returns the cumulative epsilon."""
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds += rounds
        self.epsilon = self.epsilon_after(self.rounds)
        return self.epsilon
