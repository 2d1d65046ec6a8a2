"""Many LoRA adapters on one base model, batched: stacked adapter weights applied per row (pure torch).

Every LoRA target (an `nn.Linear` of the base) gets a forward hook and a stack of adapter weights, one slot
per loaded adapter: `A (slots, R, in)`, `B (slots, out, R)`, `scale (slots,)`, slot 0 all zeros (the base).
A forward pass whose rows use different adapters gathers each row's A/B by slot and adds
`scale * (x A^T) B^T` with two batched matmuls per layer, whatever the number of adapters (the idea of
Punica/S-LoRA's batched LoRA kernels, here with torch.bmm); a pass with one adapter uses two plain matmuls.

Why not PEFT's mixed-adapter forward (`adapter_names=[...]`): it loops over the adapters in every LoRA layer
and indexes rows with Python lists (a host-to-device copy and sync per layer and adapter on a GPU), and adds
and removes hooks on every module at every call. Measured on an H200 with a SmolLM2-135M-shaped model and 64
sequences per batch: 8 adapters took 0.5 s per decode step and 32 adapters 1.5 s (one adapter: 0.05 s).

Routing is eager (`select`: slots from adapter names, per forward pass) or through device tensors that a
captured CUDA graph keeps reading (`route_one` / `route_rows`: the fast path's persistent buffers). `version`
changes whenever the stacks are reallocated or a layer gets its first hook, which invalidates graphs.

Adapters are read straight from PEFT's files (`adapter_config.json`, `adapter_model.safetensors`); plain LoRA
on linear layers is served, including `rank_pattern` / `alpha_pattern` and rsLoRA scaling. DoRA, LoRA on
embeddings, `modules_to_save`, LoRA biases and other variants are refused with the reason. Only the engine
thread calls these methods.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BASE", "AdapterError", "AdapterNotServable", "LoraAdapters", "read_lora"]

BASE = "__base__"  # the "no adapter" row (PEFT's name for it too)
_PREFIX = "base_model.model."
# adapter_config fields that change the maths; anything but these defaults is a variant we do not implement
_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "lora_bias": False, "bias": "none",
                "fan_in_fan_out": False, "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None,
                "alora_invocation_tokens": None}


class AdapterError(RuntimeError):
    """Adapter files that cannot be read, or that do not fit this base model."""


class AdapterNotServable(AdapterError):
    """A LoRA variant this server does not implement (DoRA, embedding LoRA, modules_to_save, ...)."""


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT matches pattern keys against the end of the module path
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_lora(path: str | Path, key: str = "adapter") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT LoRA files -> {module path: (A (r, in), B (out, r), scale)}; refuses variants it cannot serve."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {key!r}: cannot read {folder}/adapter_config.json ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterNotServable(f"adapter {key!r} is a {cfg.get('peft_type')} adapter; only LoRA is served")
    for option, default in _UNSUPPORTED.items():
        if cfg.get(option, default) not in (default, [], {}):
            what = "DoRA" if option == "use_dora" else f"{option}={cfg[option]!r}"
            raise AdapterNotServable(f"adapter {key!r} uses {what}, which this server cannot batch; merge it into "
                                     "its base with `fineray export` and serve the merged model as the base")
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"adapter {key!r}: {folder} has no adapter_model.safetensors")
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight"):
                raise AdapterNotServable(f"adapter {key!r}: unexpected tensor {name} (not plain LoRA)")
            continue
        module = name[: -len(".lora_A.weight")].removeprefix(_PREFIX)
        b = tensors.get(name.replace(".lora_A.", ".lora_B."))
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(f"adapter {key!r}: malformed LoRA pair for {module}")
        r = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[module] = (a, b, scale)
    if not out:
        raise AdapterError(f"adapter {key!r}: no LoRA weights in {folder}")
    return out


@dataclass
class _Stack:
    a: torch.Tensor  # (slots, R, in)
    b: torch.Tensor  # (slots, out, R)
    scale: torch.Tensor  # (slots,)
    # slot -> its own contiguous (A, B, scale), for passes where every row uses one adapter: on the CPU a linear
    # layer whose weight is a view into the stack (non-zero storage offset) ran 10-100x slower than on a copy
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


class LoraAdapters:
    """Adapter slots and per-row routing for one base model (hooks on its linear layers)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, base: str):
        self.model, self.device, self.base = model, device, base
        self.dtype = next(model.parameters()).dtype
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self._stacks: dict[str, _Stack] = {}
        self._slots: dict[str, int] = {}  # adapter key -> slot (0 is the base)
        self._capacity = 1
        self._rank = 1
        # routing of the current forward pass: None (base only), an int slot (one adapter), or row slots
        self._uniform: int | torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self.version = 0  # bumped when stack tensors are reallocated or hooks are added

    def slot(self, key: str) -> int:
        """The slot rows of adapter `key` use (0: the base)."""
        return 0 if key == BASE else self._slots[key]

    def loaded(self) -> list[str]:
        return list(self._slots)

    def load(self, key: str, path: str) -> str:
        """Read the adapter in `path` into a free slot; returns `key` (the name rows use)."""
        weights = read_lora(path, key)
        missing = [m for m in weights if m not in self._linears]
        if missing:
            raise AdapterNotServable(f"adapter {key!r} targets {missing[0]}, which is not a linear layer of base "
                                     f"{self.base!r} (trained for another model, or LoRA on embeddings)")
        for m, (a, b, _) in weights.items():
            lin = self._linears[m]
            if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
                raise AdapterError(f"adapter {key!r}: {m} has shape {tuple(b.shape)}x{tuple(a.shape)}, the base "
                                   f"layer is {lin.out_features}x{lin.in_features} (another base model?)")
        slot = next((s for s in range(1, self._capacity) if s not in self._slots.values()), self._capacity)
        # capacity doubles (not +1) so a new adapter rarely reallocates the stacks (and invalidates CUDA graphs)
        self._grow(slot + 1 if slot < self._capacity else 2 * self._capacity,
                   max(a.shape[0] for a, _, _ in weights.values()))
        for m, (a, b, scale) in weights.items():
            st = self._stack(m)
            r = a.shape[0]
            st.a[slot].zero_()
            st.b[slot].zero_()
            st.a[slot, :r] = a.to(self.device, self.dtype)
            st.b[slot, :, :r] = b.to(self.device, self.dtype)
            st.scale[slot] = scale
            st.parts[slot] = (st.a[slot, :r].clone(), st.b[slot, :, :r].clone(), scale)
        self._slots[key] = slot
        return key

    def delete(self, key: str) -> None:
        slot = self._slots.pop(key)
        for st in self._stacks.values():  # a reused slot must not keep another adapter's weights
            st.a[slot].zero_()
            st.b[slot].zero_()
            st.scale[slot] = 0.0
            st.parts.pop(slot, None)

    def select(self, names: list[str]) -> None:
        """Route the rows of the next forward pass (an adapter key or BASE per row)."""
        slots = [0 if n == BASE else self._slots[n] for n in names]
        first = slots[0]
        if all(s == first for s in slots):
            self._uniform, self._rows = (None if first == 0 else first), None
        else:
            self._uniform, self._rows = None, torch.tensor(slots, device=self.device)  # one copy per pass

    def route_one(self, slot: torch.Tensor) -> None:
        """Every row of the next pass uses the adapter in `slot` (a 1-element device tensor)."""
        self._uniform, self._rows = slot, None

    def route_rows(self, slots: torch.Tensor) -> None:
        """Row i of the next pass uses the adapter in `slots[i]` (a device tensor, 0 = base)."""
        self._uniform, self._rows = None, slots

    def done(self) -> None:
        self._uniform, self._rows = None, None

    # ------------------------------------------------------------------ internals
    def _grow(self, capacity: int, rank: int) -> None:
        """Make room for `capacity` slots of rank `rank` (copying the stacks when they grow)."""
        capacity, rank = max(capacity, self._capacity), max(rank, self._rank)
        if capacity == self._capacity and rank == self._rank:
            return
        for st in self._stacks.values():
            a = st.a.new_zeros((capacity, rank, st.a.shape[2]))
            b = st.b.new_zeros((capacity, st.b.shape[1], rank))
            s = st.scale.new_zeros(capacity)
            a[: st.a.shape[0], : st.a.shape[1]] = st.a
            b[: st.b.shape[0], :, : st.b.shape[2]] = st.b
            s[: st.scale.shape[0]] = st.scale
            st.a, st.b, st.scale = a, b, s
        self._capacity, self._rank = capacity, rank
        self.version += 1

    def _stack(self, module: str) -> _Stack:
        st = self._stacks.get(module)
        if st is None:
            lin = self._linears[module]
            kw = {"device": self.device, "dtype": self.dtype}
            st = _Stack(torch.zeros((self._capacity, self._rank, lin.in_features), **kw),
                        torch.zeros((self._capacity, lin.out_features, self._rank), **kw),
                        torch.zeros(self._capacity, **kw))
            self._stacks[module] = st
            self.version += 1
            lin.register_forward_hook(lambda mod, inp, out, m=module: self._apply(m, inp[0], out))
        return st

    def _apply(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        st = self._stacks[module]
        u = self._uniform
        if u is not None:
            if isinstance(u, torch.Tensor):  # graph routing: gather the one adapter by a device index
                a, b, s = st.a.index_select(0, u)[0], st.b.index_select(0, u)[0], st.scale.index_select(0, u)
            else:
                if u not in st.parts:  # this layer is not a target of that adapter
                    return None
                a, b, s = st.parts[u]
            return out + (torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * s).to(out.dtype)
        if self._rows is None:
            return None
        rows = self._rows
        x3 = x.reshape(rows.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
        h = torch.bmm(x3.to(self.dtype), st.a[rows].transpose(1, 2))  # (batch, tokens, R)
        y = torch.bmm(h, st.b[rows].transpose(1, 2)) * st.scale[rows].view(-1, 1, 1)  # (batch, tokens, out)
        return out + y.reshape(out.shape).to(out.dtype)
