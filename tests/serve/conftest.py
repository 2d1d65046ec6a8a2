"""Serve fixtures: random-but-non-trivial LoRA adapters on tiny:llama in a temporary registry, and a PEFT
reference model to check served tokens against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(out_dir: Path, seed: int, r: int = 4, scale: float = 0.3, base_model: str = "tiny:llama") -> Path:
    """A PEFT LoRA adapter for a tiny model with random A and random non-zero B (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_base_model

    base = load_base_model(ModelConfig(base=base_model))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saved adapters with different weights: alpha (seed 1) and beta (seed 2), plus gamma (seed 3)."""
    root = tmp_path_factory.mktemp("adapters-src")
    return {name: make_adapter(root / name, seed) for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3))}


@pytest.fixture
def make_registry(tmp_path: Path, adapter_dirs: dict[str, Path]) -> Callable[..., Path]:
    """`make_registry(names=("alpha", "beta"))`: a fresh registry folder with those adapters (v1 each)."""
    from fineray.train.registry import AdapterRegistry

    def build(names: tuple[str, ...] = ("alpha", "beta"), root: Path | None = None) -> Path:
        root = root or tmp_path / "registry"
        reg = AdapterRegistry(str(root))
        for n in names:
            reg.register(n, adapter_dirs[n], base_model="tiny:llama", method="lora")
        return root

    return build


@pytest.fixture(scope="session")
def peft_reference(adapter_dirs: dict[str, Path]) -> Callable[[str | None, list[int], int], list[int]]:
    """`ref(adapter or None, prompt_ids, max_new_tokens) -> new token ids`: greedy PEFT `generate`, one prompt
    at a time, the offline ground truth for what the server must return."""
    from peft import PeftModel

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_base_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(base="tiny:llama"))
    base = load_base_model(ModelConfig(base="tiny:llama"))
    base.config.use_cache = True
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapter_dirs[n]), adapter_name=n)
    model.eval()

    @torch.no_grad()
    def generate(adapter: str | None, ids: list[int], max_new_tokens: int) -> list[int]:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, adapter_names=[adapter or "__base__"],
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return out[0, len(ids):].tolist()

    return generate
