"""Secure aggregation of silo updates with pairwise additive masks.

After Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning" (ACM CCS). The server learns only ``sum_i w_i x_i`` and ``sum_i w_i``, never one silo's
vector, assuming an honest-but-curious server that does not collude with silos.

Protocol per round (``round_id``) and attempt:

1. Every silo makes an X25519 key pair (:func:`generate_keypair`); the server relays the public keys.
2. Silos ``i, j`` agree on ``k_ij = X25519(sk_i, pk_j)`` and derive a 32-byte seed
   ``s_ij = HKDF-SHA256(k_ij, info = tag | round_id | attempt | min(i,j) | max(i,j))``; fresh per
   round *and* attempt so that a re-run never reuses a mask.
3. Silo ``i`` encodes ``[w_i * clip(x_i); w_i]`` in fixed point (scale ``2^frac_bits``, unbiased
   stochastic rounding) modulo ``2^32`` or ``2^64`` and adds ``PRG(s_ij)`` for every peer ``j > i``,
   subtracts it for ``j < i``. The PRG is the ChaCha20 keystream keyed by ``s_ij`` (zero nonce: the
   key is single-use). A masked vector is uniformly distributed on its own.
4. The server adds the masked vectors modulo ``2^b``; the masks cancel pairwise, leaving the encoded
   sums, which it decodes and returns as ``(sum_i w_i x_i, sum_i w_i)``; the caller divides.

Dropouts. Masks cancel only if every silo's vector arrives. The default, simplest honest policy:
if any silo drops after the keys were exchanged, the server aborts the round (``unmask`` raises
:class:`SecAggDropoutError`) and re-runs it without the dropped silos, with a new attempt number
(:func:`plan_rerun`). Optional recovery: each silo Shamir-shares its private key with its peers
(:meth:`SecAggClient.share_private_key`); ``threshold`` survivors give the server the shares of a
dropped silo, which lets it recompute and strip that silo's masks from the survivors' vectors.
Caveat: this repo omits Bonawitz's second "self" mask, so after recovering silo ``d`` the server
could unmask a *late* vector from ``d``; it must discard late vectors of recovered silos, and shares
must travel encrypted between silos (transport is the caller's). Prefer abort/re-run.

Cost: each silo expands ``n - 1`` PRG streams of ``d + 1`` words (ChaCha20 runs at GB/s); the
server does ``n`` modular additions of ``d + 1`` words. Fixed-point overflow is ruled out up front:
``n * max_weight * max(clip, 1) * 2^frac_bits`` must stay below ``2^b / 2``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fineray.federated.shamir import Share, shamir_combine, shamir_split

__all__ = [
    "RerunPlan",
    "SecAggClient",
    "SecAggConfig",
    "SecAggDropoutError",
    "SecAggOverflowError",
    "SecAggServer",
    "generate_keypair",
    "plan_rerun",
    "prg",
    "shamir_combine",
    "shamir_split",
]

_HKDF_TAG = b"fineray/secagg/v1"


class SecAggOverflowError(ValueError):
    """The fixed-point sum could wrap around the modulus for this configuration."""


class SecAggDropoutError(RuntimeError):
    """Masked vectors are missing, so the masks cannot cancel; re-run without ``dropped``."""

    def __init__(self, dropped: Iterable[int], survivors: Iterable[int]) -> None:
        self.dropped = tuple(sorted(dropped))
        self.survivors = tuple(sorted(survivors))
        super().__init__(
            f"silos {list(self.dropped)} dropped after masking; abort and re-run the round with "
            f"{list(self.survivors)} (see plan_rerun) or recover their keys from Shamir shares"
        )


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


@dataclass(frozen=True)
class RerunPlan:
    """What to do after a dropout: re-run with ``silos`` under attempt number ``attempt``."""

    silos: tuple[int, ...]
    dropped: tuple[int, ...]
    attempt: int


def plan_rerun(participants: Iterable[int], received: Iterable[int], attempt: int) -> RerunPlan:
    """Abort policy: the silos to re-run the round with and the fresh attempt number.

    Args:
        participants: Silos that took part in the key exchange of the aborted attempt.
        received: Silos whose masked vector arrived.
        attempt: The aborted attempt number; the re-run uses ``attempt + 1`` (fresh masks).

    Raises:
        ValueError: If fewer than 2 silos remain (a "sum" of one reveals it).
    """
    parts, got = set(participants), set(received)
    survivors = tuple(sorted(parts & got))
    if len(survivors) < 2:
        raise ValueError(f"only {list(survivors)} left: secure aggregation needs at least 2 silos")
    return RerunPlan(silos=survivors, dropped=tuple(sorted(parts - got)), attempt=attempt + 1)


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: ``(private_key, raw 32-byte public key)``."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """Expands a 32-byte seed into ``length`` uniform words of ``dtype`` (ChaCha20 keystream)."""
    dtype = np.dtype(dtype)
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype)


def _pair_seed(
    private: X25519PrivateKey, peer_public: bytes, lo: int, hi: int, round_id: int, attempt: int
) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = _HKDF_TAG + struct.pack("<QQqq", round_id, attempt, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


class SecAggClient:
    """One silo's side: encodes, clips and masks its weighted update.

    Args:
        silo_id: This silo's id (distinct integers across participants).
        peers_public_keys: ``{silo_id: raw public key}`` of all participants of this attempt (this
            silo's own entry, if present, is checked against ``private_key``).
        private_key: This silo's X25519 key from :func:`generate_keypair`.
        config: Shared :class:`SecAggConfig`.
        round_id: Federated round number.
        attempt: Attempt number within the round (bumped by :func:`plan_rerun`).
    """

    def __init__(
        self,
        silo_id: int,
        peers_public_keys: Mapping[int, bytes],
        private_key: X25519PrivateKey,
        config: SecAggConfig,
        *,
        round_id: int = 0,
        attempt: int = 0,
    ) -> None:
        own = private_key.public_key().public_bytes_raw()
        if silo_id in peers_public_keys and peers_public_keys[silo_id] != own:
            raise ValueError(f"public key listed for silo {silo_id} is not this silo's")
        self.silo_id = silo_id
        self.peers = {j: bytes(pk) for j, pk in peers_public_keys.items() if j != silo_id}
        if len(self.peers) + 1 > config.num_silos:
            raise ValueError(f"{len(self.peers) + 1} participants exceed config.num_silos={config.num_silos}")
        if not self.peers:
            raise ValueError("secure aggregation needs at least one peer")
        self.config = config
        self.round_id = round_id
        self.attempt = attempt
        self._private = private_key

    def encode(
        self, vector: torch.Tensor, weight: float, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Fixed-point encoding of ``[weight * clip(vector); weight]`` without masks (mod ``2^b``)."""
        cfg = self.config
        if not 0 <= weight <= cfg.max_weight:
            raise ValueError(f"weight {weight} outside [0, max_weight={cfg.max_weight}]")
        x = vector.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("update contains NaN/Inf; validate it before secure aggregation")
        values = torch.cat(
            [x.clamp(-cfg.clip, cfg.clip) * weight, torch.tensor([float(weight)], dtype=torch.float64)]
        )
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

    def mask(
        self, vector: torch.Tensor, weight: float, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Returns the masked encoding of ``[weight * clip(vector); weight]`` to send to the server.

        Args:
            vector: Flat update (e.g. from :func:`fineray.federated._lora.flatten`), any float dtype.
            weight: Example count, in ``[0, config.max_weight]``.
            generator: Source of the stochastic-rounding noise; default seeded from ``os.urandom``.

        Returns:
            ``uint32``/``uint64`` array of ``len(vector) + 1`` words, uniform-looking on its own.
        """
        out = self.encode(vector, weight, generator)
        for j, pk in sorted(self.peers.items()):
            lo, hi = min(self.silo_id, j), max(self.silo_id, j)
            m = prg(_pair_seed(self._private, pk, lo, hi, self.round_id, self.attempt), out.size, out.dtype)
            if j > self.silo_id:
                np.add(out, m, out=out)  # wraps mod 2^b
            else:
                np.subtract(out, m, out=out)
        return out

    def share_private_key(self, threshold: int) -> dict[int, Share]:
        """Shamir shares of this silo's private key, one per peer (send each encrypted to its peer).

        Args:
            threshold: Survivor shares needed to recover the key; choose ``> n / 2`` so that the
                server cannot collect them for silos that are still alive.

        Returns:
            ``{peer_id: (x, y)}``.
        """
        peers = sorted(self.peers)
        shares = shamir_split(self._private.private_bytes_raw(), len(peers), threshold)
        return dict(zip(peers, shares, strict=True))


class SecAggServer:
    """Server side: sums masked vectors and decodes the weighted sum.

    Args:
        public_keys: ``{silo_id: raw public key}`` of all participants of this attempt.
        config: Shared :class:`SecAggConfig`.
        round_id: Federated round number.
        attempt: Attempt number within the round.
    """

    def __init__(
        self, public_keys: Mapping[int, bytes], config: SecAggConfig, *, round_id: int = 0, attempt: int = 0
    ) -> None:
        if len(public_keys) < 2 or len(public_keys) > config.num_silos:
            raise ValueError(f"need 2..{config.num_silos} participants, got {len(public_keys)}")
        self.public_keys = {i: bytes(pk) for i, pk in public_keys.items()}
        self.config = config
        self.round_id = round_id
        self.attempt = attempt

    def unmask(
        self,
        masked_vectors: Mapping[int, np.ndarray],
        recovered_shares: Mapping[int, list[Share]] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Sums the masked vectors and decodes ``(sum_i w_i clip(x_i), sum_i w_i)``.

        Args:
            masked_vectors: ``{silo_id: masked array}`` as returned by :meth:`SecAggClient.mask`.
            recovered_shares: Optional ``{dropped_silo: [shares from survivors]}`` to strip the
                masks of dropped silos instead of aborting (see the module caveat).

        Returns:
            ``(weighted_sum float64 tensor of length d, total_weight)``; the weighted mean is
            ``weighted_sum / total_weight``.

        Raises:
            SecAggDropoutError: If a participant's vector is missing and its shares are not given.
            ValueError: On unknown silos, fewer than 2 vectors, or inconsistent lengths/dtypes.
        """
        cfg = self.config
        unknown = set(masked_vectors) - set(self.public_keys)
        if unknown:
            raise ValueError(f"vectors from non-participants {sorted(unknown)}")
        recovered = dict(recovered_shares or {})
        dropped = set(self.public_keys) - set(masked_vectors)
        if dropped - set(recovered):
            raise SecAggDropoutError(dropped, masked_vectors)
        if len(masked_vectors) < 2:
            raise ValueError("fewer than 2 vectors: their 'sum' would reveal a single silo's update")
        lengths = {v.size for v in masked_vectors.values()}
        if len(lengths) != 1 or any(v.dtype != cfg.dtype for v in masked_vectors.values()):
            raise ValueError(f"masked vectors must share one length and dtype {cfg.dtype}")
        total = np.zeros(lengths.pop(), dtype=cfg.dtype)
        for vec in masked_vectors.values():
            np.add(total, vec, out=total)
        for d in sorted(dropped):
            self._strip_masks(total, d, recovered[d], survivors=masked_vectors)
        signed = total.view(np.int64 if cfg.modulus_bits == 64 else np.int32).astype(np.float64) / cfg.scale
        return torch.from_numpy(signed[:-1].copy()), float(signed[-1])

    def _strip_masks(
        self, total: np.ndarray, dropped: int, shares: list[Share], survivors: Iterable[int]
    ) -> None:
        """Removes the masks survivors shared with ``dropped`` (its key rebuilt from Shamir shares)."""
        private = X25519PrivateKey.from_private_bytes(shamir_combine(shares, 32))
        if private.public_key().public_bytes_raw() != self.public_keys[dropped]:
            raise ValueError(f"shares of silo {dropped} do not reconstruct its key (too few or corrupted)")
        for v in survivors:
            lo, hi = min(v, dropped), max(v, dropped)
            m = prg(
                _pair_seed(private, self.public_keys[v], lo, hi, self.round_id, self.attempt),
                total.size,
                total.dtype,
            )
            # Survivor v added the mask if dropped > v, subtracted it otherwise: undo that.
            if dropped > v:
                np.subtract(total, m, out=total)
            else:
                np.add(total, m, out=total)
