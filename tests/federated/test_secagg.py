"""Secure aggregation: correctness of the unmasked sum, masking quality, overflow, dropouts, Shamir."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fineray.federated._lora import flatten, unflatten
from fineray.federated.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggDropoutError,
    SecAggOverflowError,
    SecAggServer,
    generate_keypair,
    plan_rerun,
    prg,
    shamir_combine,
    shamir_split,
)


def _setup(silos: list[int], config: SecAggConfig, attempt: int = 0):
    keys = {i: generate_keypair() for i in silos}
    public = {i: pk for i, (_, pk) in keys.items()}
    clients = {i: SecAggClient(i, public, keys[i][0], config, round_id=5, attempt=attempt) for i in silos}
    return clients, SecAggServer(public, config, round_id=5, attempt=attempt)


def test_unmasked_sum_matches_plain_weighted_sum():
    # Prepare
    n, d, frac_bits = 4, 2000, 20
    config = SecAggConfig(num_silos=n, clip=4.0, frac_bits=frac_bits, max_weight=1000.0)
    clients, server = _setup(list(range(n)), config)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(n)]
    ws = [10.0, 250.0, 31.0, 999.0]
    # Execute
    masked = {i: clients[i].mask(xs[i], ws[i]) for i in range(n)}
    weighted_sum, total = server.unmask(masked)
    # Assert
    plain = sum(w * x.clamp(-4, 4) for w, x in zip(ws, xs))
    assert total == pytest.approx(sum(ws), abs=n * 2.0**-frac_bits)
    assert float((weighted_sum - plain).abs().max()) <= n * 2.0**-frac_bits
    assert float((weighted_sum / total - plain / sum(ws)).abs().max()) < 1e-6


def test_adapter_roundtrip_through_secagg_32bit(make_adapter):
    # Prepare: 32-bit words, small clip so that 3 silos fit the signed range.
    config = SecAggConfig(num_silos=3, clip=8.0, frac_bits=12, modulus_bits=32)
    clients, server = _setup([3, 7, 9], config)
    adapters = {i: make_adapter(dtype=torch.float32) for i in (3, 7, 9)}
    # Execute
    masked = {}
    for i, adapter in adapters.items():
        vec, spec = flatten(adapter)
        masked[i] = clients[i].mask(vec, 1.0)
    weighted_sum, total = server.unmask(masked)
    mean = unflatten(weighted_sum / total, spec)
    # Assert
    assert all(m.dtype == np.uint32 for m in masked.values())
    for key in spec.keys:
        expected = sum(a[key].clamp(-8, 8) for a in adapters.values()) / 3
        torch.testing.assert_close(mean[key], expected, atol=3 * 2.0**-12, rtol=0)


def test_single_masked_vector_is_uncorrelated_and_uniform():
    # Prepare
    d = 10_000
    config = SecAggConfig(num_silos=3, clip=10.0, frac_bits=16)
    clients, _ = _setup([0, 1, 2], config)
    x = torch.linspace(-10, 10, d, dtype=torch.float64)
    # Execute
    masked = clients[1].mask(x, 1.0)[:-1]
    as_unit = masked.astype(np.float64) / 2.0**64
    # Assert: no linear relation with the input, and flat histogram (chi^2 with 15 dof; p=0.999 ~ 37.7).
    corr = np.corrcoef(x.numpy(), as_unit)[0, 1]
    assert abs(corr) < 0.05
    counts = np.histogram(as_unit, bins=16, range=(0.0, 1.0))[0]
    chi2 = float(((counts - d / 16) ** 2 / (d / 16)).sum())
    assert chi2 < 37.7
    assert abs(as_unit.mean() - 0.5) < 0.01


def test_masks_are_fresh_per_attempt_and_prg_is_deterministic():
    # Prepare
    config = SecAggConfig(num_silos=2, clip=1.0)
    (sk0, pk0), (_sk1, pk1) = generate_keypair(), generate_keypair()
    public = {0: pk0, 1: pk1}
    zero = torch.zeros(64, dtype=torch.float64)
    # Execute
    first = SecAggClient(0, public, sk0, config, attempt=0).mask(zero, 0.0)
    again = SecAggClient(0, public, sk0, config, attempt=0).mask(zero, 0.0)
    rerun = SecAggClient(0, public, sk0, config, attempt=1).mask(zero, 0.0)
    # Assert
    assert np.array_equal(first, again)  # zero input: the vector is the mask itself
    assert not np.array_equal(first, rerun)
    assert np.array_equal(prg(b"k" * 32, 8, np.uint64), prg(b"k" * 32, 8, np.uint64))


def test_overflow_check_raises_clear_error():
    # Execute / Assert: 10 silos * clip 4 * 2^16 < 2^31 fits; 10_000 silos would wrap.
    SecAggConfig(num_silos=10, clip=4.0, frac_bits=16, modulus_bits=32)
    with pytest.raises(SecAggOverflowError, match="may wrap"):
        SecAggConfig(num_silos=10_000, clip=4.0, frac_bits=16, modulus_bits=32)
    with pytest.raises(SecAggOverflowError):
        SecAggConfig(num_silos=100, clip=1.0, frac_bits=60, modulus_bits=64)


def test_weight_above_bound_and_nan_rejected():
    # Prepare
    config = SecAggConfig(num_silos=2, clip=1.0, max_weight=10.0)
    clients, _ = _setup([0, 1], config)
    # Execute / Assert
    with pytest.raises(ValueError, match="max_weight"):
        clients[0].mask(torch.zeros(3), 11.0)
    with pytest.raises(ValueError, match="NaN"):
        clients[0].mask(torch.tensor([0.0, float("nan")]), 1.0)


def test_dropout_aborts_and_rerun_without_dropped_silo_succeeds():
    # Prepare
    config = SecAggConfig(num_silos=4, clip=2.0, frac_bits=16)
    clients, server = _setup([0, 1, 2, 3], config)
    xs = {i: torch.full((50,), float(i) / 4, dtype=torch.float64) for i in range(4)}
    masked = {i: clients[i].mask(xs[i], 1.0) for i in (0, 1, 3)}  # silo 2 vanished after masking
    # Execute
    with pytest.raises(SecAggDropoutError) as excinfo:
        server.unmask(masked)
    plan = plan_rerun([0, 1, 2, 3], received=masked, attempt=0)
    clients2, server2 = _setup(list(plan.silos), config, attempt=plan.attempt)
    weighted_sum, total = server2.unmask({i: clients2[i].mask(xs[i], 1.0) for i in plan.silos})
    # Assert
    assert excinfo.value.dropped == (2,) and excinfo.value.survivors == (0, 1, 3)
    assert plan.silos == (0, 1, 3) and plan.dropped == (2,) and plan.attempt == 1
    assert total == pytest.approx(3.0)
    torch.testing.assert_close(
        weighted_sum, torch.full((50,), 1.0, dtype=torch.float64), atol=3 * 2.0**-16, rtol=0
    )
    with pytest.raises(ValueError, match="at least 2"):
        plan_rerun([0, 1], received=[0], attempt=0)


def test_shamir_recovery_strips_dropped_silo_masks():
    # Prepare: every silo shares its key 3-out-of-4 with its peers before masking.
    silos = [0, 1, 2, 3, 4]
    config = SecAggConfig(num_silos=5, clip=2.0, frac_bits=16, max_weight=2.0)
    clients, server = _setup(silos, config)
    shares = {i: clients[i].share_private_key(threshold=3) for i in silos}
    xs = {i: torch.linspace(-1, 1, 40, dtype=torch.float64) * i for i in silos}
    masked = {i: clients[i].mask(xs[i], 2.0) for i in silos if i != 4}  # silo 4 drops
    # Execute: three survivors hand the server their share of silo 4's key.
    recovered = {4: [shares[4][j] for j in (0, 2, 3)]}
    weighted_sum, total = server.unmask(masked, recovered_shares=recovered)
    # Assert
    expected = 2.0 * sum(xs[i].clamp(-2, 2) for i in (0, 1, 2, 3))
    assert total == pytest.approx(8.0)
    torch.testing.assert_close(weighted_sum, expected, atol=4 * 2.0**-16, rtol=0)
    with pytest.raises(ValueError, match="do not reconstruct|too few"):
        server.unmask(masked, recovered_shares={4: [shares[4][0], shares[4][1]]})


def test_shamir_split_combine_threshold():
    # Prepare
    secret = bytes(range(32))
    # Execute
    shares = shamir_split(secret, n=5, threshold=3)
    # Assert
    assert shamir_combine(shares[:3]) == secret
    assert shamir_combine([shares[4], shares[1], shares[2]]) == secret
    assert shamir_combine(shares) == secret
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(secret, n=2, threshold=3)
