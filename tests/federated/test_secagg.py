"""Secure aggregation: correctness of the unmasked sum, masking quality, overflow, dropouts, Shamir."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fineray.federated._lora import flatten, unflatten
from fineray.federated.secagg import (
    Reveal,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggOverflowError,
    SecAggServer,
    prg,
    resolve_threshold,
)
from fineray.federated.shamir import shamir_combine, shamir_split


def _run(xs: dict[int, torch.Tensor], ws: dict[int, float], config: SecAggConfig, *, threshold: int | None = None,
         drop_before_sharing=(), drop_after_sharing=(), round_id: int = 5):
    """Runs the four steps for silos ``xs``; some never share, some share but never send their vector."""
    clients = {i: SecAggClient(i, config, round_id=round_id) for i in xs}
    keyset = {i: c.keys for i, c in clients.items()}
    t = threshold or resolve_threshold(None, len(keyset))
    outboxes = {i: c.share(keyset, t) for i, c in clients.items() if i not in drop_before_sharing}
    sharers = sorted(outboxes)
    masked = {i: clients[i].mask(xs[i], ws[i], {u: box[i] for u, box in outboxes.items() if u != i})
              for i in sharers if i not in drop_after_sharing}
    alive, gone = sorted(masked), [i for i in sharers if i not in masked]
    reveals = {i: clients[i].reveal(alive, gone) for i in alive}
    server = SecAggServer(keyset, config, t, round_id=round_id)
    return server, masked, sharers, reveals, clients


def test_unmasked_sum_matches_plain_weighted_sum():
    # Prepare
    n, d, frac_bits = 4, 2000, 20
    config = SecAggConfig(num_silos=n, clip=4.0, frac_bits=frac_bits, max_weight=1000.0)
    gen = torch.Generator().manual_seed(0)
    xs = {i: torch.randn(d, generator=gen, dtype=torch.float64) for i in range(n)}
    ws = {0: 10.0, 1: 250.0, 2: 31.0, 3: 999.0}
    # Execute
    server, masked, sharers, reveals, _ = _run(xs, ws, config)
    weighted_sum, total = server.unmask(masked, sharers, reveals)
    # Assert
    plain = sum(ws[i] * xs[i].clamp(-4, 4) for i in range(n))
    assert total == pytest.approx(sum(ws.values()), abs=n * 2.0**-frac_bits)
    assert float((weighted_sum - plain).abs().max()) <= n * 2.0**-frac_bits
    assert float((weighted_sum / total - plain / sum(ws.values())).abs().max()) < 1e-6


def test_adapter_roundtrip_through_secagg_32bit(make_adapter):
    # Prepare: 32-bit words, small clip so that 3 silos fit the signed range.
    config = SecAggConfig(num_silos=3, clip=8.0, frac_bits=12, modulus_bits=32)
    adapters = {i: make_adapter(dtype=torch.float32) for i in (3, 7, 9)}
    flat = {i: flatten(a) for i, a in adapters.items()}
    # Execute
    server, masked, sharers, reveals, _ = _run({i: v for i, (v, _) in flat.items()}, dict.fromkeys(adapters, 1.0),
                                               config)
    weighted_sum, total = server.unmask(masked, sharers, reveals)
    spec = flat[3][1]
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
    x = torch.linspace(-10, 10, d, dtype=torch.float64)
    # Execute
    _, masked, *_ = _run({0: x, 1: x, 2: x}, {0: 1.0, 1: 1.0, 2: 1.0}, config)
    as_unit = masked[1][:-1].astype(np.float64) / 2.0**64
    # Assert: no linear relation with the input, and flat histogram (chi^2 with 15 dof; p=0.999 ~ 37.7).
    corr = np.corrcoef(x.numpy(), as_unit)[0, 1]
    assert abs(corr) < 0.05
    counts = np.histogram(as_unit, bins=16, range=(0.0, 1.0))[0]
    chi2 = float(((counts - d / 16) ** 2 / (d / 16)).sum())
    assert chi2 < 37.7
    assert abs(as_unit.mean() - 0.5) < 0.01


def test_masks_are_fresh_per_round_and_prg_is_deterministic():
    # Prepare
    config = SecAggConfig(num_silos=2, clip=1.0)
    zero = {0: torch.zeros(64, dtype=torch.float64), 1: torch.zeros(64, dtype=torch.float64)}
    # Execute
    first = _run(zero, {0: 0.0, 1: 0.0}, config, round_id=1)[1][0]
    again = _run(zero, {0: 0.0, 1: 0.0}, config, round_id=1)[1][0]
    # Assert: a zero input leaves only masks; fresh keys and seeds give fresh masks even in the same round.
    assert not np.array_equal(first, again) and first.any()
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
    client = SecAggClient(0, SecAggConfig(num_silos=2, clip=1.0, max_weight=10.0))
    # Execute / Assert
    with pytest.raises(ValueError, match="max_weight"):
        client.encode(torch.zeros(3), 11.0)
    with pytest.raises(ValueError, match="NaN"):
        client.encode(torch.tensor([0.0, float("nan")]), 1.0)


@pytest.mark.parametrize("dropped", [(4,), (1, 3)])
def test_silos_dropping_after_sharing_are_recovered_from_the_survivors_shares(dropped):
    # Prepare: five silos share 3-out-of-5; silo 2 never shares (nothing to recover), ``dropped`` never mask.
    config = SecAggConfig(num_silos=5, clip=2.0, frac_bits=16, max_weight=10.0)
    xs = {i: torch.linspace(-1, 1, 40, dtype=torch.float64) * (i + 1) for i in range(5)}
    ws = {i: float(i + 1) for i in range(5)}
    # Execute
    server, masked, sharers, reveals, _ = _run(xs, ws, config, threshold=2 if len(dropped) == 2 else 3,
                                               drop_before_sharing=(2,), drop_after_sharing=dropped)
    weighted_sum, total = server.unmask(masked, sharers, reveals)
    # Assert: exactly the plain weighted sum of the survivors (their weights renormalise the mean).
    alive = [i for i in range(5) if i != 2 and i not in dropped]
    assert sorted(masked) == alive
    assert total == pytest.approx(sum(ws[i] for i in alive), abs=1e-3)
    expected = sum(ws[i] * xs[i].clamp(-2, 2) for i in alive)
    torch.testing.assert_close(weighted_sum, expected, atol=len(alive) * 2.0**-16, rtol=0)


def test_too_few_survivors_inconsistent_lists_and_bad_shares_are_refused():
    # Prepare: 4 silos, threshold 3; two drop after sharing.
    config = SecAggConfig(num_silos=4, clip=1.0)
    xs = {i: torch.full((8,), 0.1 * i, dtype=torch.float64) for i in range(4)}
    clients = {i: SecAggClient(i, config) for i in xs}
    keyset = {i: c.keys for i, c in clients.items()}
    boxes = {i: c.share(keyset, 3) for i, c in clients.items()}
    masked = {i: clients[i].mask(xs[i], 1.0, {u: b[i] for u, b in boxes.items() if u != i}) for i in (0, 1)}
    server = SecAggServer(keyset, config, 3)
    # Execute / Assert: the server refuses to decode, and the survivors refuse to reveal.
    with pytest.raises(SecAggError, match="only 2 of 4 silos delivered masked vectors, fewer than the threshold 3"):
        server.unmask(masked, [0, 1, 2, 3], {})
    with pytest.raises(SecAggError, match="only 2 survivors, fewer than the threshold 3"):
        clients[0].reveal([0, 1], [2, 3])
    with pytest.raises(SecAggError, match="do not partition"):
        clients[0].reveal([0, 1, 2], [2, 3])  # silo 2 both alive and dropped: both of its masks would leak
    with pytest.raises(SecAggError, match="only 2 silos shared their keys, fewer than the threshold 3: refusing"):
        clients[2].mask(xs[2], 1.0, {0: boxes[0][2]})
    tampered = {u: b[3][:-1] + bytes([b[3][-1] ^ 1]) for u, b in boxes.items() if u != 3}
    with pytest.raises(SecAggError, match="do not decrypt"):
        clients[3].mask(xs[3], 1.0, tampered)


def test_wrong_shares_do_not_rebuild_a_seed_or_key():
    # Prepare: 3 silos, threshold 2, nobody drops; then one reveal is corrupted.
    config = SecAggConfig(num_silos=3, clip=1.0)
    xs = {i: torch.zeros(4, dtype=torch.float64) for i in range(3)}
    server, masked, sharers, reveals, _ = _run(xs, {0: 1.0, 1: 1.0, 2: 1.0}, config, threshold=2)
    corrupt = {0: Reveal(seeds={v: (x, y + 1) for v, (x, y) in reveals[0].seeds.items()}), 1: reveals[1]}
    # Execute / Assert
    with pytest.raises(SecAggError, match="do not rebuild it"):
        server.unmask(masked, sharers, corrupt)
    with pytest.raises(SecAggError, match="only 1 survivors revealed"):
        server.unmask(masked, sharers, {0: reveals[0]})
    assert Reveal.from_json(reveals[2].to_json()) == reveals[2]
    with pytest.raises(SecAggError, match="a reveal must be"):
        Reveal.from_json({"seeds": "nope"})


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
