"""DP-FedAvg: clipping, calibrated Gaussian noise, RDP accounting."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from fineray.federated.dp import (
    DPAccountant,
    add_noise,
    clip_update,
    private_mean,
    secure_generator,
    update_norm,
)


def test_clip_update_bounds_global_norm_and_keeps_small_updates():
    # Prepare
    big = {"a": torch.full((10,), 3.0), "b": torch.full((2, 3), -4.0)}
    small = {"a": torch.tensor([0.3, 0.4])}
    # Execute
    clipped, norm = clip_update(big, clip_norm=1.5)
    untouched, small_norm = clip_update(small, clip_norm=1.5)
    # Assert
    assert norm == pytest.approx(math.sqrt(10 * 9 + 6 * 16))
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    torch.testing.assert_close(clipped["a"] / clipped["a"][0], torch.ones(10))  # direction kept
    assert small_norm == pytest.approx(0.5)
    torch.testing.assert_close(untouched["a"], small["a"])


def test_noise_std_matches_z_c_over_m():
    # Prepare
    z, c, m = 1.3, 0.8, 5
    zeros = {"w": torch.zeros(200_000)}
    # Execute
    noisy = add_noise(
        zeros, clip_norm=c, noise_multiplier=z, num_silos=m, generator=torch.Generator().manual_seed(0)
    )
    # Assert
    std = float(noisy["w"].std())
    assert std == pytest.approx(z * c / m, rel=0.02)
    assert abs(float(noisy["w"].mean())) < 5 * (z * c / m) / math.sqrt(200_000)  # 5 sigma of the mean


def test_private_mean_clips_each_silo_then_averages_uniformly():
    # Prepare: with z = 0 the output is exactly the uniform mean of clipped deltas.
    deltas = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.5])}]
    # Execute
    mean, norms = private_mean(deltas, clip_norm=1.0, noise_multiplier=0.0, generator=secure_generator())
    # Assert
    assert norms == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(mean["w"], torch.tensor([0.3, 0.65]))


def test_accountant_epsilon_increases_monotonically(caplog):
    # Prepare
    caplog.set_level(logging.ERROR)  # dp_accounting logs convergence notes for fractional orders
    accountant = DPAccountant(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5)
    # Execute
    eps = [accountant.step() for _ in range(5)]
    jump = accountant.step(rounds=45)
    # Assert
    assert all(0 < a < b for a, b in itertools.pairwise(eps))
    assert accountant.rounds == 50 and jump > eps[-1]
    assert accountant.epsilon_after(0) == 0.0
    assert accountant.event.count == 50


def test_accountant_matches_dp_accounting_composition():
    # Prepare
    from dp_accounting import dp_event, rdp

    reference = rdp.RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(2.0)), 20)
    accountant = DPAccountant(noise_multiplier=2.0, sample_rate=1.0, delta=1e-6)
    # Execute
    eps = accountant.step(rounds=20)
    # Assert
    assert eps == pytest.approx(reference.get_epsilon(1e-6), rel=1e-9)
    with pytest.raises(ValueError):
        DPAccountant(noise_multiplier=1.0, sample_rate=1.5, delta=1e-5)
