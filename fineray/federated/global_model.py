"""The federation's global model: adapter folders, the folded base residual, ranks, the exported adapter.

Exact strategies (FedEx-LoRA, FLoRA, FlexLoRA with ``keep_residual``) return a factored residual
``B_res @ A_res`` that belongs in the frozen base weight. The federation keeps the running sum of those
residuals, *with the LoRA scaling folded in*, as one factored :data:`Residual` per module, re-compressed
after every round by a thin SVD of the stacked factors (:func:`fold_residual`). Compression matters for
privacy too: FedEx-LoRA's raw residual stacks every silo's own factors, while the SVD of the sum reveals
only the sum, which is what the silos receive.

* Training and evaluation add ``B @ A`` to the base weight of each module in memory
  (:func:`merge_residual`), below the trainable adapter: the global model is ``W0 + R + s B A``.
* The exported adapter is exact: per module ``A' = [A; A_R]``, ``B' = [B, B_R / s]`` zero-padded to one
  rank ``r'`` with ``lora_alpha' = s r'`` so that PEFT's scaling ``alpha' / r'`` equals ``s``; then
  ``s B' A' = s B A + B_R A_R``. It is a normal PEFT folder, so ``fineray serve`` loads it as is.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fineray.base.storage import atomic_dir
from fineray.federated._lora import lora_pairs, scale_lora
from fineray.federated.strategies.base import BaseDelta
from fineray.federated.strategies.flexlora import factored_svd, truncate_for_rank
from fineray.train.config import RunConfig

__all__ = [
    "Residual",
    "adapter_rank",
    "export_peft",
    "fold_residual",
    "from_silo_rank",
    "initial_adapter",
    "load_adapter_model",
    "lora_scaling",
    "merge_residual",
    "quiet_hf",
    "read_adapter_dir",
    "residual_from_tensors",
    "residual_to_tensors",
    "to_silo_rank",
    "with_rank",
    "write_adapter_dir",
]

#: ``{module_prefix: (B (out, k), A (k, in))}``; ``B @ A`` is added to the module's base weight as is
#: (the LoRA scaling is already inside ``B``).
Residual = dict[str, tuple[torch.Tensor, torch.Tensor]]

_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def quiet_hf() -> None:
    """No per-load "Loading weights" progress bars (a federation loads the base many times per round)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def lora_scaling(config: Mapping[str, Any], r: int | None = None) -> float:
    """PEFT's scaling of an adapter config: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    rank = int(r if r is not None else config["r"])
    alpha = float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The largest LoRA rank among the modules of an adapter."""
    return max(int(tensors[a].shape[0]) for a, _ in lora_pairs(tensors).values())


def with_rank(config: Mapping[str, Any], r: int) -> dict[str, Any]:
    """A copy of a PEFT adapter config at rank ``r`` (same ``lora_alpha``, so scaling ``alpha / r``)."""
    out = dict(config)
    out["r"] = int(r)
    out["rank_pattern"], out["alpha_pattern"] = {}, {}
    return out


def write_adapter_dir(path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Writes a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), atomically replaced."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / _WEIGHTS))
        (tmp / _CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    return path


def read_adapter_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` of a PEFT folder."""
    path = Path(path)
    return load_file(str(path / _WEIGHTS)), json.loads((path / _CONFIG).read_text())


def initial_adapter(run_cfg: RunConfig, seed: int, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The round-0 global adapter: PEFT's own initialisation (``B = 0``) of ``run_cfg``'s LoRA, seeded.

    Args:
        run_cfg: The federation's :class:`~fineray.train.config.RunConfig`.
        seed: Seed of the ``A`` initialisation (used when ``lora.init_seed`` is unset), so a
            coordinator restarted before its first checkpoint recreates the same adapter.
        rank: Global rank (default ``lora.r``).

    Returns:
        ``(tensors, adapter_config)``; the config's ``base_model_name_or_path`` is the base spec.
    """
    from fineray.train.checkpoint import save_weights
    from fineray.train.model import load_for_training

    quiet_hf()
    cfg = run_cfg.model_copy(deep=True)
    cfg.method = "lora"  # same keys and shapes as QLoRA, and loadable without a GPU
    cfg.model.dtype = "float32"
    if rank is not None:
        cfg.lora.r = rank
    if cfg.lora.init_seed is None:
        cfg.lora.init_seed = seed
    _, model = load_for_training(cfg)
    with tempfile.TemporaryDirectory(prefix="fineray-init-") as tmp:
        folder = save_weights(model, Path(tmp), cfg.model.base)
        tensors, config = read_adapter_dir(folder)
    config["inference_mode"] = True
    return tensors, config


def to_silo_rank(adapter: Mapping[str, torch.Tensor], config: Mapping[str, Any], r: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global adapter as a rank-``r`` silo adapter with the same effective product.

    Keeps the first ``r`` components (the best rank-``r`` part for FlexLoRA's SVD-ordered global) and
    rescales ``B`` so that ``s_r B_r A_r`` matches ``s_R B A`` on those components.
    """
    r_global = adapter_rank(adapter)
    if r == r_global:
        return dict(adapter), dict(config)
    cut = truncate_for_rank(adapter, r)
    return scale_lora(cut, lora_scaling(config, r_global) / lora_scaling(config, r)), with_rank(config, r)


def from_silo_rank(update: Mapping[str, torch.Tensor], config: Mapping[str, Any], r_global: int
                   ) -> dict[str, torch.Tensor]:
    """A silo's rank-``r`` update expressed in the global scaling (``B`` times ``s_r / s_R``)."""
    r = adapter_rank(update)
    if r == r_global:
        return dict(update)
    return scale_lora(update, lora_scaling(config, r) / lora_scaling(config, r_global))


def fold_residual(residual: Residual | None, base_delta: BaseDelta | None, scaling: float,
                  rtol: float = 1e-7) -> Residual | None:
    """Adds ``scaling * B_res @ A_res`` of a round to the running residual, re-compressed.

    The stacked factors are replaced by a thin SVD of their product (never forming the dense matrix,
    see :func:`~fineray.federated.strategies.flexlora.factored_svd`), dropping singular values below
    ``rtol * s_max``: the result is exact to float precision and its rank never exceeds
    ``min(out, in)``.
    """
    if not base_delta:
        return residual
    out: Residual = dict(residual or {})
    for prefix, (b_res, a_res) in base_delta.items():
        bs = [b_res.to(torch.float64) * scaling]
        as_ = [a_res.to(torch.float64)]
        if prefix in out:
            bs.insert(0, out[prefix][0].to(torch.float64))
            as_.insert(0, out[prefix][1].to(torch.float64))
        u, s, vh = factored_svd(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
        keep = max(1, int((s > rtol * float(s.max())).sum())) if s.numel() and float(s.max()) > 0 else 1
        root = s[:keep].sqrt()
        dtype = b_res.dtype if b_res.is_floating_point() else torch.float32
        out[prefix] = ((u[:, :keep] * root).to(dtype), (root[:, None] * vh[:keep]).to(dtype))
    return out


def residual_to_tensors(residual: Residual) -> dict[str, torch.Tensor]:
    """Flat tensor dict of a residual (``<prefix>.residual_B`` / ``<prefix>.residual_A``)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, (b, a) in residual.items():
        out[f"{prefix}.residual_B"], out[f"{prefix}.residual_A"] = b, a
    return out


def residual_from_tensors(tensors: Mapping[str, torch.Tensor]) -> Residual:
    """Inverse of :func:`residual_to_tensors`."""
    prefixes = {k.rsplit(".residual_", 1)[0] for k in tensors}
    return {p: (tensors[f"{p}.residual_B"], tensors[f"{p}.residual_A"]) for p in sorted(prefixes)}


def merge_residual(model: torch.nn.Module, residual: Residual | None) -> None:
    """Adds each module's ``B @ A`` to its frozen base weight, in place (PEFT-wrapped or plain model).

    Module prefixes are PEFT adapter prefixes (``base_model.model.<name>``); for a plain transformers
    model the ``base_model.model.`` part is dropped.
    """
    if not residual:
        return
    modules = dict(model.named_modules())
    for prefix, (b, a) in residual.items():
        module = modules.get(prefix) or modules.get(prefix.removeprefix("base_model.model."))
        if module is None:
            raise KeyError(f"residual module {prefix!r} not found in the model")
        target = getattr(module, "base_layer", module)
        weight = target.weight
        with torch.no_grad():
            delta = b.to(device=weight.device, dtype=torch.float32) @ a.to(device=weight.device, dtype=torch.float32)
            weight.add_(delta.to(weight.dtype))


def export_peft(adapter: Mapping[str, torch.Tensor], config: Mapping[str, Any], residual: Residual | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plain PEFT adapter equal to ``W0 + R + s B A`` (see the module docstring); ``residual=None`` is a copy."""
    if not residual:
        return dict(adapter), dict(config)
    s = lora_scaling(config, adapter_rank(adapter))
    pairs = lora_pairs(adapter)
    missing = sorted(set(residual) - set(pairs))
    if missing:
        raise KeyError(f"residual modules without an adapter module: {missing[:3]}")
    r_new = max(int(adapter[a].shape[0]) + (int(residual[p][1].shape[0]) if p in residual else 0)
                for p, (a, _) in pairs.items())
    out = dict(adapter)
    for prefix, (a_key, b_key) in pairs.items():
        a, b = adapter[a_key], adapter[b_key]
        a_new = torch.zeros((r_new, a.shape[1]), dtype=torch.float32)
        b_new = torch.zeros((b.shape[0], r_new), dtype=torch.float32)
        r = a.shape[0]
        a_new[:r], b_new[:, :r] = a.float(), b.float()
        if prefix in residual:
            b_r, a_r = residual[prefix]
            k = a_r.shape[0]
            a_new[r:r + k], b_new[:, r:r + k] = a_r.float(), b_r.float() / s
        out[a_key], out[b_key] = a_new.to(a.dtype), b_new.to(b.dtype)
    cfg = with_rank(config, r_new)
    cfg["lora_alpha"] = s * math.sqrt(r_new) if config.get("use_rslora") else s * r_new
    return out, cfg


def load_adapter_model(run_cfg: RunConfig, adapter_dir: str | Path, residual: Residual | None = None,
                       device: str = "cpu") -> tuple[Any, torch.nn.Module]:
    """Tokenizer and eval-mode model ``base (+ residual) + adapter`` for loss evaluation."""
    from peft import PeftModel

    from fineray.train.model import load_base_model, load_tokenizer, resolve_base

    quiet_hf()
    path = resolve_base(run_cfg.model.base)
    tok = load_tokenizer(run_cfg.model, path)
    method = "lora" if run_cfg.method == "qlora" and device == "cpu" else run_cfg.method
    base = load_base_model(run_cfg.model, method=method, use_gpu=device != "cpu", path=path)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).to(device)
    merge_residual(model, residual)
    model.eval()
    return tok, model
