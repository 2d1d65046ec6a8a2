"""Secure aggregation of silo updates that survives dropouts: pairwise and self masks, Shamir-shared keys.

The protocol of Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (ACM CCS; semi-honest variant), which SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", ACM CCS) keeps while sharing only with the neighbours of a
sparse random graph. Cross-silo federations have tens of silos, so every silo shares with every other (the
complete graph of the original). The server learns ``sum_i w_i x_i`` and ``sum_i w_i`` over the silos that
finished, never one silo's vector, assuming an honest-but-curious server that colludes with fewer than ``t``
silos. Per round (``round_id``), with ``t`` the threshold:

0. **Keys.** Silo ``u`` makes two X25519 pairs, ``c`` (to encrypt shares) and ``s`` (for pairwise masks),
   and a 32-byte self-mask seed ``b_u``; it sends ``c_pk``, ``s_pk`` and ``sha256(b_u)``
   (:class:`AdvertisedKeys`). The server freezes the key set ``U1``.
1. **Shares.** ``u`` Shamir-splits ``s_sk_u`` and ``b_u`` ``t``-out-of-``|U1|`` and sends every peer ``v``
   its two shares encrypted under ``KDF(X25519(c_sk_u, c_pk_v))`` through the server
   (:mod:`._secagg_crypto`). ``U2`` = the silos whose shares arrived.
2. **Masked input.** ``u`` in ``U2`` receives the ciphertexts addressed to it and sends, modulo ``2^b``,
   ``y_u = enc([w_u clip(x_u); w_u]) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)``
   with ``s_uv = KDF(X25519(s_sk_u, s_pk_v))``; ``enc`` is fixed point (scale ``2^frac_bits``, unbiased
   stochastic rounding). ``U3`` = the silos whose ``y`` arrived.
3. **Unmasking.** Every survivor is told ``U3`` and the dropped set ``U2 \\ U3``. It checks that the two
   partition ``U2`` and that ``|U3| >= t``, then reveals its share of ``b_v`` for each survivor and of
   ``s_sk_d`` for each dropped silo, never both for one silo (:class:`Reveal`). From ``t`` reveals the
   server rebuilds each ``b_v`` (checked against its hash) and each ``s_sk_d`` (checked against ``s_pk_d``),
   removes the self masks and the pairwise masks the survivors share with dropped silos, and decodes.

A silo that drops after step 1 therefore costs nothing but its own contribution: the round completes with the
survivors and the mean is renormalised over them (their weights are inside the sum). The self mask is what
keeps recovery safe: a "dropped" silo's vector arriving late would still carry ``PRG(b_d)``, which the server
never learns together with ``s_sk_d``.

**Threshold.** ``t`` survivors are needed (fewer: :class:`SecAggError`; the round fails, the global adapter
stays); ``t`` colluding silos plus the server could unmask one silo. The default (:func:`resolve_threshold`)
is a majority: no two disjoint groups of ``t`` silos exist, so a server lying about who dropped could not
collect both masks of a live silo. Lower thresholds tolerate more dropouts and protect less.

**Cost.** Per silo ``|U2|`` PRG streams of ``d + 1`` words (ChaCha20, GB/s) and ``O(n t)`` field operations;
the server ``|U3| (1 + |dropped|)`` streams. Overflow is ruled out up front (:class:`SecAggConfig`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fineray.federated._secagg_crypto import (
    SecAggError,
    agree,
    decrypt_shares,
    encrypt_shares,
    generate_keypair,
    prg,
)
from fineray.federated.shamir import Share, shamir_combine, shamir_split

__all__ = [
    "AdvertisedKeys",
    "Reveal",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggOverflowError",
    "SecAggServer",
    "prg",
    "resolve_threshold",
]


class SecAggOverflowError(ValueError):
    """The fixed-point sum could wrap around the modulus for this configuration."""


@dataclass(frozen=True)
class SecAggConfig:
    """Fixed-point and field parameters, shared by all silos and the server.

    Attributes:
        num_silos: Upper bound on the number of participants (used for the overflow check).
        clip: Each update element is clipped to ``[-clip, clip]`` before weighting.
        frac_bits: Fractional bits; quantisation error of the decoded sum is below
            ``n * 2^-frac_bits`` per element (before dividing by the total weight).
        modulus_bits: 32 or 64; arithmetic is numpy ``uint32`` / ``uint64`` wrap-around.
        max_weight: Upper bound on a silo's weight (example count); the weight is masked too.

    Raises:
        SecAggOverflowError: If ``num_silos * max_weight * max(clip, 1) * 2^frac_bits`` reaches
            ``2^modulus_bits / 2`` (the signed sum could wrap).
    """

    num_silos: int
    clip: float = 1.0
    frac_bits: int = 16
    modulus_bits: int = 64
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if self.num_silos < 2:
            raise ValueError("secure aggregation needs at least 2 silos")
        if not (self.clip > 0 and self.max_weight > 0 and 0 <= self.frac_bits < self.modulus_bits):
            raise ValueError(f"bad clip/max_weight/frac_bits in {self}")
        worst = self.num_silos * self.max_weight * max(self.clip, 1.0) * self.scale
        if worst >= 2.0 ** (self.modulus_bits - 1):
            raise SecAggOverflowError(
                f"{self.num_silos} silos x max_weight {self.max_weight} x clip {max(self.clip, 1.0)} x "
                f"2^{self.frac_bits} = {worst:.3g} >= 2^{self.modulus_bits - 1}: the sum may wrap; "
                "lower frac_bits/clip or use modulus_bits=64"
            )

    @property
    def scale(self) -> float:
        """Fixed-point scale ``2^frac_bits``."""
        return float(2**self.frac_bits)

    @property
    def dtype(self) -> np.dtype:
        """Unsigned word type whose wrap-around implements the modulus."""
        return np.dtype(np.uint64 if self.modulus_bits == 64 else np.uint32)


def resolve_threshold(threshold: float | None, n: int) -> int:
    """The number of silos ``t`` that must survive, for a key set of ``n`` silos.

    Args:
        threshold: A count (``>= 2``), a fraction of ``n`` in ``(0, 1]`` (rounded up), or None for a
            majority, ``n // 2 + 1``.
        n: Silos in the key set.

    Returns:
        ``t``, at least 2 (a "sum" of one vector reveals it); it may exceed ``n`` (the caller refuses).
    """
    if threshold is None:
        t = n // 2 + 1
    elif isinstance(threshold, float):
        t = math.ceil(threshold * n - 1e-9)
    else:
        t = int(threshold)
    return max(2, t)


@dataclass(frozen=True)
class AdvertisedKeys:
    """What a silo publishes in step 0: its two public keys and the hash of its self-mask seed."""

    enc_pk: bytes
    mask_pk: bytes
    seed_hash: bytes

    def to_json(self) -> dict[str, str]:
        return {"enc_pk": self.enc_pk.hex(), "mask_pk": self.mask_pk.hex(), "seed_hash": self.seed_hash.hex()}

    @classmethod
    def from_json(cls, data: Any) -> AdvertisedKeys:
        """Raises: SecAggError: Not three 32-byte hex strings."""
        try:
            keys = cls(*(bytes.fromhex(data[k]) for k in ("enc_pk", "mask_pk", "seed_hash")))
        except (KeyError, TypeError, ValueError):
            raise SecAggError("keys must be {enc_pk, mask_pk, seed_hash} as hex strings") from None
        if any(len(v) != 32 for v in (keys.enc_pk, keys.mask_pk, keys.seed_hash)):
            raise SecAggError("public keys and the seed hash are 32 bytes each")
        return keys


@dataclass(frozen=True)
class Reveal:
    """One survivor's step-3 answer: its shares of each survivor's seed and of each dropped silo's mask key."""

    seeds: dict[int, Share] = field(default_factory=dict)
    mask_keys: dict[int, Share] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, list[Any]]]:
        return {kind: {str(i): [x, hex(y)] for i, (x, y) in getattr(self, kind).items()}
                for kind in ("seeds", "mask_keys")}

    @classmethod
    def from_json(cls, data: Any) -> Reveal:
        """Raises: SecAggError: Not ``{seeds, mask_keys}`` of ``{id: [x, hex y]}``."""
        try:
            return cls(*({int(i): (int(x), int(y, 16)) for i, (x, y) in data[kind].items()}
                         for kind in ("seeds", "mask_keys")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecAggError("a reveal must be {seeds: {id: [x, hex]}, mask_keys: {id: [x, hex]}}") from None


class SecAggClient:
    """One silo's side of one round: keys, shares, masked input, reveal (in this order).

    Args:
        silo_id: This silo's id (distinct integers across the federation).
        config: Shared :class:`SecAggConfig`.
        round_id: Federated round number (binds every derived seed and ciphertext to it).
    """

    def __init__(self, silo_id: int, config: SecAggConfig, *, round_id: int = 0) -> None:
        self.silo_id, self.config, self.round_id = silo_id, config, round_id
        self._enc, enc_pk = generate_keypair()
        self._mask, mask_pk = generate_keypair()
        self._seed = os.urandom(32)
        self.keys = AdvertisedKeys(enc_pk, mask_pk, hashlib.sha256(self._seed).digest())
        self._keyset: dict[int, AdvertisedKeys] = {}
        self._threshold = 0
        self._outbox: dict[int, bytes] = {}
        self._held: dict[int, tuple[Share, Share]] = {}  # sender -> (its mask-key share, its seed share) for me
        self._sharers: frozenset[int] = frozenset()
        self._masked: np.ndarray | None = None
        self._revealed: tuple[frozenset[int], frozenset[int]] | None = None

    def share(self, keyset: Mapping[int, AdvertisedKeys], threshold: int) -> dict[int, bytes]:
        """Step 1: ``{peer: ciphertext}`` of this silo's shares for every other silo of the key set.

        Raises:
            SecAggError: This silo's keys are not in ``keyset``, or ``threshold`` is outside ``2..len(keyset)``.
        """
        if self._outbox:
            return dict(self._outbox)  # asked again (reconnect): the same shares
        if keyset.get(self.silo_id) != self.keys:
            raise SecAggError(f"the key set does not hold silo {self.silo_id}'s keys")
        n = len(keyset)
        if not 2 <= threshold <= n or n > self.config.num_silos:
            raise SecAggError(f"threshold {threshold} must be in 2..{n} (silos in the key set, at most "
                              f"{self.config.num_silos})")
        ids = sorted(keyset)
        mask_shares = shamir_split(self._mask.private_bytes_raw(), n, threshold)
        seed_shares = shamir_split(self._seed, n, threshold)
        for v, s_share, b_share in zip(ids, mask_shares, seed_shares, strict=True):
            if v == self.silo_id:
                self._held[v] = (s_share, b_share)
                continue
            key = agree(self._enc, keyset[v].enc_pk, b"share", self.round_id, self.silo_id, v)
            self._outbox[v] = encrypt_shares(key, self.round_id, self.silo_id, v, s_share, b_share)
        self._keyset, self._threshold = dict(keyset), threshold
        return dict(self._outbox)

    def encode(self, vector: torch.Tensor, weight: float, generator: torch.Generator | None = None) -> np.ndarray:
        """Fixed-point encoding of ``[weight * clip(vector); weight]`` without masks (mod ``2^b``)."""
        cfg = self.config
        if not 0 <= weight <= cfg.max_weight:
            raise ValueError(f"weight {weight} outside [0, max_weight={cfg.max_weight}]")
        x = vector.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("update contains NaN/Inf; validate it before secure aggregation")
        values = torch.cat([x.clamp(-cfg.clip, cfg.clip) * weight, torch.tensor([float(weight)], dtype=torch.float64)])
        scaled = values * cfg.scale
        if generator is None:  # rounding noise only needs to be unpredictable, not reproducible
            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        floor = torch.floor(scaled)
        # Unbiased stochastic rounding: round up with probability equal to the fractional part.
        up = torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - floor)
        ints = (floor + up.to(torch.float64)).numpy().astype(np.int64)
        if cfg.modulus_bits == 64:
            return ints.view(np.uint64).copy()  # two's complement == residue mod 2^64
        return (ints & 0xFFFFFFFF).astype(np.uint32)

    def mask(self, vector: torch.Tensor, weight: float, inbox: Mapping[int, bytes],
             generator: torch.Generator | None = None) -> np.ndarray:
        """Step 2: the masked encoding of ``[weight * clip(vector); weight]``.

        Args:
            vector: Flat update (e.g. from :func:`fineray.federated._lora.flatten`), any float dtype.
            weight: Example count, in ``[0, config.max_weight]``.
            inbox: ``{sender: ciphertext}`` addressed to this silo by every other silo of ``U2``.
            generator: Source of the stochastic-rounding noise; default seeded from ``os.urandom``.

        Returns:
            ``uint32``/``uint64`` array of ``len(vector) + 1`` words, uniform-looking on its own.

        Raises:
            SecAggError: Called before :meth:`share`, fewer than ``threshold`` silos shared, a sender not in
                the key set, a ciphertext that does not decrypt, or asked again for other senders (the same
                masks over another set would let the server subtract two vectors).
        """
        if not self._keyset:
            raise SecAggError(f"silo {self.silo_id} has not shared its keys in round {self.round_id}")
        sharers = frozenset(inbox) | {self.silo_id}
        if self._masked is not None:
            if sharers != self._sharers:
                raise SecAggError(f"silo {self.silo_id} already masked for silos {sorted(self._sharers)}")
            return self._masked.copy()  # asked again (reconnect): the same vector
        if not sharers <= set(self._keyset):
            raise SecAggError(f"shares from silos outside the key set: {sorted(sharers - set(self._keyset))}")
        if len(sharers) < self._threshold:
            raise SecAggError(f"only {len(sharers)} silos shared their keys, fewer than the threshold "
                              f"{self._threshold}: refusing to mask")
        for u, blob in inbox.items():
            key = agree(self._enc, self._keyset[u].enc_pk, b"share", self.round_id, self.silo_id, u)
            self._held[u] = decrypt_shares(key, self.round_id, u, self.silo_id, blob)
        self._sharers = sharers
        out = self.encode(vector, weight, generator)
        np.add(out, prg(self._seed, out.size, out.dtype), out=out)  # wraps mod 2^b
        for v in sorted(sharers - {self.silo_id}):
            m = prg(agree(self._mask, self._keyset[v].mask_pk, b"mask", self.round_id, self.silo_id, v),
                    out.size, out.dtype)
            (np.add if v > self.silo_id else np.subtract)(out, m, out=out)
        self._masked = out.copy()
        return out

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int]) -> Reveal:
        """Step 3: shares of the survivors' seeds and of the dropped silos' mask keys.

        Raises:
            SecAggError: Called before :meth:`mask`; the lists do not partition the silos that shared; fewer
                than ``threshold`` survivors; or asked again with different lists (answering both could hand
                the server both masks of one silo).
        """
        alive, gone = frozenset(survivors), frozenset(dropped)
        if not self._sharers:
            raise SecAggError(f"silo {self.silo_id} has not masked in round {self.round_id}")
        if alive & gone or alive | gone != self._sharers or self.silo_id not in alive:
            raise SecAggError(f"survivors {sorted(alive)} and dropped {sorted(gone)} do not partition the silos "
                              f"that shared keys, {sorted(self._sharers)}")
        if len(alive) < self._threshold:
            raise SecAggError(f"only {len(alive)} survivors, fewer than the threshold {self._threshold}: "
                              "refusing to reveal")
        if self._revealed is not None and self._revealed != (alive, gone):
            raise SecAggError("already revealed for a different set of survivors")
        self._revealed = (alive, gone)
        return Reveal(seeds={v: self._held[v][1] for v in sorted(alive)},
                      mask_keys={d: self._held[d][0] for d in sorted(gone)})


class SecAggServer:
    """Server side: sums the masked vectors, removes the masks with the revealed shares, decodes.

    Args:
        keyset: ``{silo_id: AdvertisedKeys}`` frozen in step 0 (``U1``).
        config: Shared :class:`SecAggConfig`.
        threshold: ``t``, as given to the silos.
        round_id: Federated round number.
    """

    def __init__(self, keyset: Mapping[int, AdvertisedKeys], config: SecAggConfig, threshold: int, *,
                 round_id: int = 0) -> None:
        if not 2 <= threshold <= len(keyset) <= config.num_silos:
            raise SecAggError(f"need 2 <= threshold ({threshold}) <= silos ({len(keyset)}) <= {config.num_silos}")
        self.keyset, self.config, self.threshold, self.round_id = dict(keyset), config, threshold, round_id

    def unmask(self, masked: Mapping[int, np.ndarray], sharers: Iterable[int],
               reveals: Mapping[int, Reveal]) -> tuple[torch.Tensor, float]:
        """Decodes ``(sum_{v in U3} w_v clip(x_v), sum_{v in U3} w_v)`` over the survivors ``U3 = masked``.

        Args:
            masked: ``{silo_id: masked array}`` of the survivors.
            sharers: ``U2``, the silos whose shares were delivered (survivors and dropped).
            reveals: ``{survivor: Reveal}``; at least ``threshold`` of them.

        Returns:
            ``(weighted_sum float64 tensor of length d, total_weight)``; the weighted mean is
            ``weighted_sum / total_weight``.

        Raises:
            SecAggError: Fewer than ``threshold`` survivors or reveals, or shares that do not rebuild a
                seed (hash mismatch) or a mask key (public key mismatch).
            ValueError: Vectors of different lengths or dtypes.
        """
        cfg, t = self.config, self.threshold
        alive, shared = set(masked), set(sharers)
        if not alive <= shared <= set(self.keyset):
            raise SecAggError(f"masked vectors from silos that did not share keys: {sorted(alive - shared)}")
        if len(alive) < t:
            raise SecAggError(f"only {len(alive)} of {len(shared)} silos delivered masked vectors, fewer than the "
                              f"threshold {t}: the dropped silos' masks cannot be removed")
        revealers = sorted(set(reveals) & alive)
        if len(revealers) < t:
            raise SecAggError(f"only {len(revealers)} survivors revealed their shares, fewer than the threshold {t}")
        lengths = {v.size for v in masked.values()}
        if len(lengths) != 1 or any(v.dtype != cfg.dtype for v in masked.values()):
            raise ValueError(f"masked vectors must share one length and dtype {cfg.dtype}")
        total = np.zeros(lengths.pop(), dtype=cfg.dtype)
        for vec in masked.values():
            np.add(total, vec, out=total)
        for v in sorted(alive):
            seed = self._combine(reveals, revealers, "seeds", v)
            if hashlib.sha256(seed).digest() != self.keyset[v].seed_hash:
                raise SecAggError(f"the revealed shares of silo {v}'s self-mask seed do not rebuild it")
            np.subtract(total, prg(seed, total.size, total.dtype), out=total)
        for d in sorted(shared - alive):
            private = X25519PrivateKey.from_private_bytes(self._combine(reveals, revealers, "mask_keys", d))
            if private.public_key().public_bytes_raw() != self.keyset[d].mask_pk:
                raise SecAggError(f"the revealed shares of dropped silo {d}'s mask key do not rebuild it")
            for v in sorted(alive):  # survivor v added PRG(s_vd) if d > v, subtracted it otherwise: undo that
                m = prg(agree(private, self.keyset[v].mask_pk, b"mask", self.round_id, d, v), total.size, total.dtype)
                (np.subtract if d > v else np.add)(total, m, out=total)
        signed = total.view(np.int64 if cfg.modulus_bits == 64 else np.int32).astype(np.float64) / cfg.scale
        return torch.from_numpy(signed[:-1].copy()), float(signed[-1])

    def _combine(self, reveals: Mapping[int, Reveal], revealers: list[int], kind: str, of: int) -> bytes:
        shares = [getattr(reveals[r], kind).get(of) for r in revealers]
        shares = [s for s in shares if s is not None][: self.threshold]
        if len(shares) < self.threshold:
            raise SecAggError(f"fewer than {self.threshold} shares of silo {of}'s {kind.replace('_', ' ')}")
        try:
            return shamir_combine(shares, 32)
        except ValueError as e:
            raise SecAggError(f"shares of silo {of}'s {kind.replace('_', ' ')}: {e}") from None
