"""Export: merge a LoRA/DoRA adapter into its base model and write a standalone safetensors model folder."""

from __future__ import annotations

import json
from pathlib import Path

from fineray.base.storage import atomic_dir

__all__ = ["merge_adapter"]


def merge_adapter(adapter: str, out: str | Path, *, registry: str = "adapters", base: str | None = None) -> Path:
    """Merge `adapter` (registry reference or folder) into its base; write weights + tokenizer to `out`.

    The base comes from the registry manifest (or the adapter's `adapter_config.json`) unless `base` is given.
    The folder is written to a temporary sibling and renamed, so a failed export leaves nothing half-written.
    """
    import torch
    from peft import PeftModel

    from fineray.train.config import ModelConfig
    from fineray.train.model import ModelError, load_base_model, load_tokenizer, resolve_base
    from fineray.train.registry import AdapterRegistry

    src = Path(adapter).expanduser()
    if src.is_dir():
        manifest_base = None
    else:
        reg = AdapterRegistry(registry)
        manifest_base = reg.get(adapter).manifest.get("base_model")
        src = reg.local_path(adapter)
    if not (src / "adapter_config.json").is_file():
        raise ModelError(f"{src} is not a PEFT adapter folder (no adapter_config.json)")
    base = base or manifest_base or json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    mcfg = ModelConfig(base=base, dtype="float32")
    path = resolve_base(base)
    tok = load_tokenizer(mcfg, path)
    model = load_base_model(mcfg, path=path)
    merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    merged.config.use_cache = True
    out = Path(out).expanduser().resolve()
    with atomic_dir(out) as tmp, torch.no_grad():
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
