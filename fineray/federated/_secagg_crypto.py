"""Primitives of secure aggregation (:mod:`fineray.federated.secagg`): key agreement, seed derivation, the
mask PRG, fixed-point words, and the encryption of Shamir shares between silos, with ``cryptography``.

* Key agreement: X25519, then HKDF-SHA256 with ``info = tag | purpose | round | min(i,j) | max(i,j)``, so a
  seed is bound to its purpose (pairwise mask or share encryption), round and pair, and never reused.
* PRG: the ChaCha20 keystream keyed by a 32-byte seed (zero nonce: every seed is single-use), read as
  little-endian ``uint32``/``uint64`` words; it runs at GB/s, far below the cost of local training.
* Share encryption: ChaCha20-Poly1305 (random 96-bit nonce) with ``tag | round | sender | recipient`` as
  associated data, so the relaying coordinator can neither read a share nor swap it to another pair or round.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fineray.federated.shamir import PRIME, Share

__all__ = ["SecAggError", "agree", "decrypt_shares", "encrypt_shares", "generate_keypair", "prg"]

_TAG = b"fineray/secagg/v2"
_ELEMENT_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one element of GF(2^521 - 1)
_NONCE_BYTES = 12


class SecAggError(ValueError):
    """A secure-aggregation step refused: too few silos, inconsistent lists, or shares that do not decrypt or
    reconstruct. The message says which and why."""


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: ``(private_key, raw 32-byte public key)``."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: bytes, round_id: int, i: int, j: int) -> bytes:
    """The 32-byte secret silos ``i`` and ``j`` both derive for ``purpose`` in ``round_id`` (symmetric in i, j).

    Raises:
        SecAggError: ``peer_public`` is not a valid X25519 public key.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"bad public key of silo {max(i, j)}: {e}") from None
    info = _TAG + purpose + struct.pack("<Qqq", round_id, min(i, j), max(i, j))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """Expands a 32-byte seed into ``length`` uniform words of ``dtype`` (ChaCha20 keystream)."""
    dtype = np.dtype(dtype)
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype)


def _aad(round_id: int, sender: int, recipient: int) -> bytes:
    return _TAG + b"share" + struct.pack("<Qqq", round_id, sender, recipient)


def encrypt_shares(key: bytes, round_id: int, sender: int, recipient: int, mask_key: Share, seed: Share) -> bytes:
    """Encrypts ``recipient``'s shares of ``sender``'s mask key and self-mask seed (one ``x`` for both)."""
    if mask_key[0] != seed[0]:
        raise SecAggError("the two shares for one recipient must have the same x")
    plain = struct.pack("<H", mask_key[0]) + mask_key[1].to_bytes(_ELEMENT_BYTES, "big") + \
        seed[1].to_bytes(_ELEMENT_BYTES, "big")
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(round_id, sender, recipient))


def decrypt_shares(key: bytes, round_id: int, sender: int, recipient: int, blob: bytes) -> tuple[Share, Share]:
    """Inverse of :func:`encrypt_shares`: ``(mask_key share, seed share)``.

    Raises:
        SecAggError: The ciphertext was not made by ``sender`` for ``recipient`` in ``round_id`` (or is corrupt).
    """
    try:
        plain = ChaCha20Poly1305(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                              _aad(round_id, sender, recipient))
    except (InvalidTag, ValueError):
        raise SecAggError(f"the shares from silo {sender} do not decrypt (tampered with, or not for silo "
                          f"{recipient} in round {round_id})") from None
    if len(plain) != 2 + 2 * _ELEMENT_BYTES:
        raise SecAggError(f"the shares from silo {sender} have the wrong length")
    (x,) = struct.unpack("<H", plain[:2])
    s_y = int.from_bytes(plain[2:2 + _ELEMENT_BYTES], "big")
    b_y = int.from_bytes(plain[2 + _ELEMENT_BYTES:], "big")
    return (x, s_y), (x, b_y)
