"""Model loading: tiny model, LoRA/DoRA/full parameter counts, resolution errors."""

import pytest
import torch

from fineray.train.config import LoraConfig, ModelConfig
from fineray.train.model import ModelError, apply_peft, count_parameters, load_base_model, resolve_base


def _lora_params(hidden=64, inter=128, layers=2, heads_kv_dim=32, r=8):
    # q,o: 64->64; k,v: 64->32 (2 kv heads x 16); gate,up: 64->128; down: 128->64. LoRA adds r*(in+out).
    shapes = [(64, 64), (64, heads_kv_dim), (64, heads_kv_dim), (64, 64), (64, inter), (64, inter), (inter, 64)]
    return layers * sum(r * (i + o) for i, o in shapes)


def test_tiny_lora_parameter_count(tiny_dir):
    model = load_base_model(ModelConfig(base="tiny:llama"), path=str(tiny_dir))
    total_before = count_parameters(model)[1]
    peft = apply_peft(model, "lora", LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    trainable, total = count_parameters(peft)
    assert trainable == _lora_params(r=8) == 16384
    assert total == total_before + trainable


def test_lora_subset_and_dora_magnitudes(tiny_dir):
    m = apply_peft(load_base_model(ModelConfig(base="tiny:llama"), path=str(tiny_dir)), "lora",
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(m)[0] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    d = apply_peft(load_base_model(ModelConfig(base="tiny:llama"), path=str(tiny_dir)), "dora",
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # DoRA adds one magnitude per output feature of each adapted layer.
    assert count_parameters(d)[0] == count_parameters(m)[0] + 2 * (64 + 32)


def test_full_finetune_trains_everything(tiny_dir):
    m = apply_peft(load_base_model(ModelConfig(base="tiny:llama"), path=str(tiny_dir)), "full", LoraConfig())
    trainable, total = count_parameters(m)
    assert trainable == total


def test_resolution_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(tmp_path))
    with pytest.raises(ModelError, match="no such directory"):
        resolve_base("/definitely/not/here")
    with pytest.raises(ModelError, match="looked up on the model hub"):
        load_base_model(ModelConfig(base="no-such-org/no-such-model"))


def test_qlora_on_cpu_is_a_clear_error(tiny_dir):
    with pytest.raises(ModelError, match="qlora needs a CUDA GPU"):
        load_base_model(ModelConfig(base="tiny:llama"), method="qlora", path=str(tiny_dir))


def test_tiny_model_is_deterministic(tiny_dir):
    a = load_base_model(ModelConfig(base="tiny:llama"), path=str(tiny_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert a(input_ids=ids).logits.shape == (1, 4, a.config.vocab_size)
