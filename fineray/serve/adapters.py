"""LoRA adapters on one base model for batched inference: load, delete, and route rows to adapters.

Rows of a forward pass may use different adapters: PEFT's mixed-adapter forward (`adapter_names=[...]`, with
`__base__` for the plain base) applies each row's LoRA weights in the same pass. Two costs of PEFT's own
`model(..., adapter_names=...)` are avoided here: it walks every module twice per call to add and remove
hooks (at one call per generated token that walk outweighs a small model's maths), so the hooks are installed
once and read the names of the current pass; and a batch with a single adapter (or only the base) takes PEFT's
plain path instead of the per-layer gather/scatter, switching the active adapter only when it changes.
Only the engine thread calls these methods.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["BASE", "AdapterError", "AdapterNotServable", "LoraAdapters"]

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches
_MIXED = "__mixed__"


class AdapterError(RuntimeError):
    """Adapter files that cannot be loaded on this base."""


class AdapterNotServable(AdapterError):
    """An adapter that cannot share a batch (PEFT's mixed-adapter forward does not support DoRA)."""


class LoraAdapters:
    """The base model, wrapped by PEFT once the first adapter loads."""

    def __init__(self, model: torch.nn.Module, device: torch.device, base: str):
        self.base_model, self.device, self.base = model, device, base
        self.peft: Any = None
        self._names: list[str] | None = None
        self._hooked: set[int] = set()
        self._active: str | None = None  # what the layers run without injected names (BASE: adapters off)

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.base_model

    @staticmethod
    def peft_name(key: str) -> str:
        """PEFT adapter names become module keys, which may not hold dots or `@`."""
        return "a" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def load(self, key: str, path: str) -> str:
        """Load the adapter in `path`; returns its PEFT name."""
        cfg_file = Path(path) / "adapter_config.json"
        if not cfg_file.is_file():
            raise AdapterError(f"adapter {key!r}: {path} has no adapter_config.json")
        try:
            use_dora = json.loads(cfg_file.read_text()).get("use_dora", False)
        except ValueError as e:
            raise AdapterError(f"adapter {key!r}: unreadable adapter_config.json ({e})") from None
        if use_dora:
            raise AdapterNotServable(
                f"adapter {key!r} is a DoRA adapter, which PEFT cannot mix with other adapters in one batch; "
                "merge it into its base with `fineray export` and serve the merged model as the base")
        name = self.peft_name(key)
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.base_model, path, adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
        except Exception as e:
            raise AdapterError(f"adapter {key!r} cannot be loaded on base {self.base!r}: {e}") from e
        self.peft.to(self.device)
        self._hook_layers()
        self._active = None
        return name

    def delete(self, name: str) -> None:
        with warnings.catch_warnings():  # "adapter X was active which is now deleted": expected here
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(name)
        self._active = None

    def select(self, names: list[str]) -> None:
        """Route the rows of the next forward pass (one PEFT name or BASE per row)."""
        if self.peft is None:
            return
        unique = set(names)
        if len(unique) > 1:
            want, self._names = _MIXED, list(names)
        else:
            want, self._names = unique.pop(), None
        if want == self._active or (want == _MIXED and self._active not in (None, BASE)):
            return
        lora = self.peft.base_model
        if want == BASE:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            if want != _MIXED:
                lora.set_adapter(want)
        self._active = want

    def done(self) -> None:
        """After a forward pass: stop injecting names."""
        self._names = None

    def _hook_layers(self) -> None:
        from peft.tuners.lora import LoraLayer

        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # older PEFT
            AuxiliaryTrainingWrapper = LoraLayer
        for module in self.peft.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._inject, with_kwargs=True)
                self._hooked.add(id(module))

    def _inject(self, module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self._names is None:
            return None
        kwargs["adapter_names"] = self._names
        return args, kwargs
