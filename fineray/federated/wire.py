"""What travels between silos and the coordinator: safetensors bytes, never pickle.

Tensors go as a safetensors file in memory (``safetensors.torch.save``); small JSON metadata rides in
the safetensors header (``__metadata__["fineray"]``), so one HTTP body carries an update, its example
count and its metrics. Masked secure-aggregation vectors (``uint32``/``uint64``) use the numpy flavour
of the same format. The header is parsed by hand before loading, so a malformed or hostile body is
rejected with a message instead of reaching the loader with absurd sizes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

__all__ = [
    "MAX_BODY_BYTES",
    "SubmitError",
    "WireError",
    "pack_array",
    "pack_tensors",
    "read_metadata",
    "sha256_bytes",
    "unpack_array",
    "unpack_tensors",
]

#: Upper bound of one body (2 GiB): a LoRA adapter of a 70B model at r=64 is ~0.5 GiB in fp32.
MAX_BODY_BYTES = 2 << 30
_META_KEY = "fineray"


class WireError(ValueError):
    """A body that is not a well-formed safetensors payload of the expected kind."""


class SubmitError(Exception):
    """A submission the coordinator refuses outright; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sha256_bytes(blob: bytes) -> str:
    """Hex sha256 of a body (used to tie a cached update to the global adapter it started from)."""
    return hashlib.sha256(blob).hexdigest()


def _header(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise WireError("body too short for a safetensors header")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(len(blob) - 8, 100 << 20):
        raise WireError(f"safetensors header of {size} bytes does not fit a {len(blob)}-byte body")
    try:
        header = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("safetensors header is not a JSON object")
    return header


def read_metadata(blob: bytes) -> dict[str, Any]:
    """The JSON metadata stored by :func:`pack_tensors` / :func:`pack_array` (``{}`` if none)."""
    meta = _header(blob).get("__metadata__") or {}
    raw = meta.get(_META_KEY)
    if raw is None:
        return {}
    try:
        out = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WireError(f"metadata is not JSON: {e}") from None
    if not isinstance(out, dict):
        raise WireError("metadata must be a JSON object")
    return out


def pack_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialises tensors (moved to CPU, made contiguous) plus JSON metadata into safetensors bytes."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return torch_save(plain, metadata={_META_KEY: json.dumps(dict(meta or {}))})


def _load(blob: bytes, load: Callable[[bytes], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A body's tensors (by `load`: torch or numpy flavour) and metadata; WireError when too large or malformed."""
    if len(blob) > MAX_BODY_BYTES:
        raise WireError(f"body of {len(blob)} bytes exceeds {MAX_BODY_BYTES}")
    meta = read_metadata(blob)
    try:
        return load(bytes(blob)), meta
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise WireError(f"not a safetensors body: {e}") from None


def unpack_tensors(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`pack_tensors`: ``(tensors, metadata)``.

    Raises:
        WireError: For anything but a valid safetensors body of float tensors.
    """
    tensors, meta = _load(blob, torch_load)
    bad = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if bad:
        raise WireError(f"non-float tensors in an adapter body: {bad}")
    return tensors, meta


def pack_array(array: np.ndarray, meta: Mapping[str, Any] | None = None, key: str = "masked") -> bytes:
    """Serialises one numpy array (e.g. a masked ``uint64`` vector) as safetensors bytes."""
    return np_save({key: np.ascontiguousarray(array)}, metadata={_META_KEY: json.dumps(dict(meta or {}))})


def unpack_array(blob: bytes, key: str = "masked") -> tuple[np.ndarray, dict[str, Any]]:
    """Inverse of :func:`pack_array`.

    Raises:
        WireError: If the body is malformed or lacks ``key``.
    """
    arrays, meta = _load(blob, np_load)
    if set(arrays) != {key}:
        raise WireError(f"expected exactly one array {key!r}, got {sorted(arrays)}")
    return arrays[key], meta
