"""LoRA state-dict helpers shared by the federated strategies, secure aggregation and validation.

An *adapter* is a ``dict[str, torch.Tensor]`` in PEFT naming, e.g.::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   # (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   # (out, r)

The *module prefix* is everything before ``.lora_A`` / ``.lora_B``. Keys carrying a PEFT adapter
name (``...lora_A.default.weight``) are recognised too. Any other key (``modules_to_save`` copies,
biases) is an "extra" tensor that strategies average element-wise.

All products in this package are the raw ``B @ A``; the LoRA scaling ``alpha / r`` is the caller's
business (see :func:`scale_lora` to fold per-silo scalings into ``B`` before aggregating).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FlatSpec",
    "acc_dtype",
    "check_same_keys",
    "extra_keys",
    "flatten",
    "fresh_adapter",
    "lora_pairs",
    "lora_ranks",
    "normalise_weights",
    "scale_lora",
    "seeded_lora_a",
    "unflatten",
    "weighted_mean",
]

# ``<prefix>.lora_A.weight`` or ``<prefix>.lora_A.<adapter_name>.weight``.
_LORA_RE = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Pairs the ``lora_A`` / ``lora_B`` keys of each adapted module.

    Args:
        state: Adapter state dict in PEFT naming.

    Returns:
        ``{module_prefix: (a_key, b_key)}`` in the key order of ``state``.

    Raises:
        ValueError: If a module has only one of its two factors, or two of the same.
    """
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in state:
        match = _LORA_RE.match(key)
        if match is None:
            continue
        target = a_keys if match["which"] == "A" else b_keys
        prefix = match["prefix"]
        if prefix in target:
            raise ValueError(f"module {prefix!r} has two lora_{match['which']} keys")
        target[prefix] = key
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise ValueError(f"LoRA modules missing their A or B factor: {unpaired}")
    return {prefix: (a_keys[prefix], b_keys[prefix]) for prefix in a_keys}


def extra_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Returns the keys of ``state`` that are not LoRA factors (averaged element-wise)."""
    return [key for key in state if _LORA_RE.match(key) is None]


def lora_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Returns ``{module_prefix: r}``; raises ``ValueError`` if A and B disagree on r."""
    ranks: dict[str, int] = {}
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        a, b = state[a_key], state[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {prefix!r}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) / (out, r)"
            )
        ranks[prefix] = int(a.shape[0])
    return ranks


def check_same_keys(updates: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raises ``ValueError`` unless every update has the key set of the first one."""
    if not updates:
        raise ValueError("need at least one update")
    expected = set(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if set(update) != expected:
            missing = sorted(expected - set(update))
            extra = sorted(set(update) - expected)
            raise ValueError(f"update {i} keys differ from update 0: missing={missing} extra={extra}")


def normalise_weights(weights: Sequence[float], n: int | None = None) -> list[float]:
    """Turns non-negative weights (e.g. example counts) into probabilities ``p_i``.

    Args:
        weights: One non-negative finite weight per update.
        n: Expected number of weights, checked if given.

    Returns:
        ``p_i = w_i / sum_j w_j``.

    Raises:
        ValueError: On a length mismatch, a negative/non-finite weight or a zero total.
    """
    if n is not None and len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} updates")
    ws = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {ws}")
    total = sum(ws)
    if total <= 0:
        raise ValueError("weights sum to zero")
    return [w / total for w in ws]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else (bf16/fp16/fp32) uses float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weighted_mean(tensors: Sequence[torch.Tensor], probs: Sequence[float]) -> torch.Tensor:
    """``sum_i p_i t_i`` accumulated in float32/64 and cast back to the first tensor's dtype."""
    dtype = acc_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for t, p in zip(tensors, probs, strict=True):
        if t.shape != out.shape:
            raise ValueError(f"cannot average shapes {tuple(out.shape)} and {tuple(t.shape)}")
        out.add_(t.to(dtype), alpha=p)
    return out.to(tensors[0].dtype)


def scale_lora(state: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Scales every ``B`` factor (hence every product ``B @ A``) by ``factor``; other keys unchanged.

    Use it to fold a silo's LoRA scaling into its factors before a rank-heterogeneous
    aggregation, e.g. ``scale_lora(update, (alpha / r_i) / (alpha / r_target))``.
    """
    out = dict(state)
    for _, b_key in lora_pairs(state).values():
        out[b_key] = state[b_key] * factor
    return out


@dataclass(frozen=True)
class FlatSpec:
    """Layout of a flattened state dict: keys, shapes and dtypes in vector order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def numel(self) -> int:
        """Total number of elements of the flat vector."""
        return sum(math.prod(s) for s in self.shapes)


def flatten(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, FlatSpec]:
    """Concatenates a state dict into one float64 CPU vector (float64 keeps fixed-point encoding exact).

    Keys are taken in sorted order so that every silo produces the same layout regardless of
    dict insertion order.

    Returns:
        ``(vector, spec)``; ``unflatten(vector, spec)`` restores the dict.
    """
    keys = tuple(sorted(state))
    parts = [state[k].detach().reshape(-1).to(device="cpu", dtype=torch.float64) for k in keys]
    vec = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    spec = FlatSpec(
        keys=keys,
        shapes=tuple(tuple(state[k].shape) for k in keys),
        dtypes=tuple(state[k].dtype for k in keys),
    )
    return vec, spec


def unflatten(vec: torch.Tensor, spec: FlatSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: splits ``vec`` back into tensors of the recorded shapes/dtypes."""
    if vec.numel() != spec.numel:
        raise ValueError(f"vector has {vec.numel()} elements, spec expects {spec.numel}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, shape, dtype in zip(spec.keys, spec.shapes, spec.dtypes, strict=True):
        size = math.prod(shape)
        out[key] = vec[offset : offset + size].reshape(shape).to(dtype)
        offset += size
    return out


def seeded_lora_a(
    shape: tuple[int, int], seed: int, name: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Deterministic PEFT-style init of one ``lora_A`` (r, in): ``U(-1/sqrt(in), 1/sqrt(in))``.

    That is PEFT's ``kaiming_uniform_(a=sqrt(5))`` bound. The stream is seeded from
    ``sha256(seed|name)`` so each module gets its own draw and the result does not depend on the
    order in which modules are initialised, nor on the platform (CPU generator, float32).
    """
    r, fan_in = shape
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bound = 1.0 / math.sqrt(fan_in)
    a = torch.rand((r, fan_in), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return a.to(dtype)


def fresh_adapter(
    template: Mapping[str, torch.Tensor], seed: int, rank: int | None = None
) -> dict[str, torch.Tensor]:
    """A freshly initialised adapter shaped like ``template``: seeded ``A``, zero ``B`` (product 0).

    Args:
        template: Adapter whose keys, dtypes and (out, in) shapes are copied.
        seed: Shared seed; every silo derives the same ``A`` from it.
        rank: Rank of the new adapter; defaults to each module's rank in ``template``.

    Returns:
        New state dict; non-LoRA keys are copied from ``template`` unchanged.
    """
    out = dict(template)
    for prefix, (a_key, b_key) in lora_pairs(template).items():
        a, b = template[a_key], template[b_key]
        r = int(a.shape[0]) if rank is None else rank
        out[a_key] = seeded_lora_a((r, int(a.shape[1])), seed, prefix, a.dtype).to(a.device)
        out[b_key] = torch.zeros((int(b.shape[0]), r), dtype=b.dtype, device=b.device)
    return out
