"""`tiny:llama`: a random-init 2-layer Llama (hidden 64) with a small BPE tokenizer, for tests.

Built offline in well under a second and cached. The tokenizer is trained on the built-in datasets
(vocab 512) and carries a ChatML chat template, like SmolLM2's, so data rendering is exercised for real.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from fineray.train._cache import build_once, cache_dir

__all__ = ["TINY_SHAPES", "tiny_model_dir"]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_SHAPES = {"llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2},
               # head size 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not tiny:llama's 16)
               "llama-hd32": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1}}


def _corpus() -> list[str]:
    root = resources.files("fineray.train") / "builtin_data"
    lines = []
    for name in ("support_tickets_train.jsonl", "general_text.jsonl"):
        for line in (root / name).read_text().splitlines():
            rec = json.loads(line)
            lines.extend(str(v) for v in rec.values())
    return lines


def _build(shape: str, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, **TINY_SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


def tiny_model_dir(shape: str = "llama") -> Path:
    """Cached directory of the tiny test model."""
    if shape not in TINY_SHAPES:
        raise ValueError(f"unknown tiny model {shape!r}; known: {sorted(TINY_SHAPES)}")
    return build_once(cache_dir() / "models" / f"tiny-{shape}-v1", lambda tmp: _build(shape, tmp))
