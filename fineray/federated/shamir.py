"""Shamir t-out-of-n secret sharing over the prime field GF(2^521 - 1).

Shamir 1979, "How to Share a Secret" (CACM 22(11)). Used by :mod:`fineray.federated.secagg` to
let the surviving silos reveal a dropped silo's X25519 private key to the server, as in Bonawitz et
al. 2017. The field is the Mersenne prime ``2^521 - 1``, large enough to hold a 32-byte key as one
element. Polynomial coefficients come from :mod:`secrets`. Pure Python ints: ``O(n t)`` to split,
``O(t^2)`` to combine, microseconds for the sizes used here.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["PRIME", "Share", "shamir_combine", "shamir_split"]

#: Field modulus: the Mersenne prime M521.
PRIME = 2**521 - 1

#: One share: ``(x, f(x))`` with ``x`` in 1..n.
Share = tuple[int, int]


def shamir_split(secret: bytes, n: int, threshold: int) -> list[Share]:
    """Splits ``secret`` into ``n`` shares, any ``threshold`` of which reconstruct it.

    Args:
        secret: At most 65 bytes (must be < ``PRIME`` as a big-endian int).
        n: Number of shares (x = 1..n).
        threshold: Shares needed to reconstruct, ``1 <= threshold <= n``; fewer reveal nothing.

    Returns:
        ``[(x, y), ...]`` for ``x = 1..n``.

    Raises:
        ValueError: On a bad threshold or a secret that does not fit the field.
    """
    if not 1 <= threshold <= n:
        raise ValueError(f"need 1 <= threshold <= n, got threshold={threshold} n={n}")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: list[Share] = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_combine(shares: Sequence[Share], length: int = 32) -> bytes:
    """Reconstructs the secret from ``threshold`` (or more) distinct shares by Lagrange at 0.

    Args:
        shares: Distinct ``(x, y)`` pairs; with fewer than the threshold the output is garbage
            (Shamir cannot detect that).
        length: Byte length of the original secret.

    Returns:
        The secret as ``length`` big-endian bytes.

    Raises:
        ValueError: On no shares, duplicated x, or a result that does not fit ``length`` bytes.
    """
    if not shares:
        raise ValueError("need at least one share")
    xs = [x % PRIME for x, _ in shares]
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("share x coordinates must be distinct and non-zero")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ValueError(f"reconstruction does not fit {length} bytes: too few or corrupted shares")
    return secret.to_bytes(length, "big")
