"""The workload of the training benchmarks: model shapes and cases, documents, the batch order, random-init models,
FLOPs per token, peak memory and the result row (method: bench/train_throughput.py's docstring).

Shared by bench/train_throughput.py (the naive, strong and fineray sides), bench/strong_baseline.py and
bench/preference_throughput.py, so every side sees the same models and the same batches.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

PEAK_TFLOPS = 790.0
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False},
    # the embedded SmolLM2-135M-Instruct: its real (GGUF-converted) weights are loaded, not a random init
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "head_dim": 128},
}


@dataclass
class Case:
    shape: str
    batch: int
    lengths: str  # realistic | full
    method: str = "lora"
    compile: bool = True
    steps: int = 12
    warmup: int = 4
    optimizer: str = "adamw"
    overrides: tuple[str, ...] = ()  # extra fineray config keys (a variant of a case: `NAME+TAG`)


CASES = {
    "tiny-real16": Case("tiny", 16, "realistic", steps=10, warmup=2, compile=False),
    "tiny-smoke": Case("tiny", 4, "realistic", steps=3, warmup=1, compile=False),
    "tiny-real8": Case("tiny", 8, "realistic", steps=6, warmup=1, compile=False),
    "smollm2-real4": Case("smollm2", 4, "realistic", steps=3, warmup=1, compile=False),
    "1b-real16": Case("1b", 16, "realistic"),
    "1b-real16-nocompile": Case("1b", 16, "realistic", compile=False),
    "1b-full8": Case("1b", 8, "full"),
    "8b-real8-nocompile": Case("8b", 8, "realistic", compile=False, steps=8, warmup=2),
    "8b-real4": Case("8b", 4, "realistic"),
    "8b-real4-long": Case("8b", 4, "realistic", steps=30),
    "8b-real8": Case("8b", 8, "realistic"),
    "8b-full4": Case("8b", 4, "full", steps=10),
    "8b-qlora-real8": Case("8b", 8, "realistic", method="qlora", optimizer="paged_adamw_8bit"),
    "8b-qlora-full4": Case("8b", 4, "full", method="qlora", steps=8),
    # Variants (`+TAG`: the table puts them beside the case they vary)
    "8b-full4+mbt4096": Case("8b", 4, "full", steps=10, overrides=("train.micro_batch_tokens=4096",)),
    "8b-full4+mbt2048": Case("8b", 4, "full", steps=10, overrides=("train.micro_batch_tokens=2048",)),
    "8b-real4-long+cattn": Case("8b", 4, "realistic", steps=30, overrides=("train.fast.compile_attention=true",)),
    "1b-real16+cattn": Case("1b", 16, "realistic", overrides=("train.fast.compile_attention=true",)),
}


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, **SHAPES[shape])


def make_docs(case: Case, n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    if case.lengths == "full":
        lengths = [2048] * n
    else:
        z = torch.randn(n, generator=g, dtype=torch.float64)
        lengths = [int(min(2048, max(16, round(300 * math.exp(0.8 * float(x)))))) for x in z]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def batch_order(n_docs: int, batch: int, seed: int) -> list[list[int]]:
    """The batches fineray's sampler draws for one worker (epoch 0)."""
    from fineray.train.batches import shard_batches

    return shard_batches(n_docs, batch, 0, 1, seed, 0)


def build_model(shape: str, device: str, method: str = "lora") -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    if shape == "smollm2":  # the embedded model itself (fineray's cached conversion of the GGUF)
        from fineray.train.config import EMBEDDED_MODEL
        from fineray.train.model import resolve_base

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = LlamaForCausalLM.from_pretrained(resolve_base(EMBEDDED_MODEL), dtype=dtype).to(device)
        model.config._attn_implementation = "sdpa"
        model.config.use_cache = False
        return model
    torch.manual_seed(0)
    cfg = llama_config(shape)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.config.use_cache = False
    if method == "qlora":
        quantize_blocks(model)
    return model


def quantize_blocks(model: torch.nn.Module) -> None:
    """Replace every block linear by a bitsandbytes NF4 Linear4bit (what `load_in_4bit` produces)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, quant_storage=torch.bfloat16
                                                 ).to(mod.weight.device)
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()


def flops_per_token(shape: str, docs: list[list[int]], method: str) -> float:
    s = SHAPES[shape]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = s.get("head_dim", h // s["num_attention_heads"])
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    n_mm = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + V * h
    ctx = sum(len(d) ** 2 / 2 for d in docs) / sum(len(d) for d in docs)
    return 2 * n_mm * (3 if method == "full" else 2) + 4 * L * q * ctx * 3


def peak_memory() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def result_row(side: str, name: str, case: Case, docs: list[list[int]], order: list[list[int]],
            ends: list[float], losses: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    w = case.warmup
    timed = order[w:len(ends)]
    tokens = sum(len(docs[i]) for b in timed for i in b)
    secs = ends[-1] - ends[w - 1] if len(ends) > w else float("nan")
    tps = tokens / secs if secs > 0 else float("nan")
    used = [docs[i] for b in order[:len(ends)] for i in b]
    fpt = flops_per_token(case.shape, used, case.method)
    return {"side": side, "case": name, "shape": case.shape, "batch": case.batch, "lengths": case.lengths,
           "method": case.method, "steps_timed": len(timed), "tokens_timed": tokens, "seconds": secs,
           "tokens_per_s": tps, "mfu": fpt * tps / (PEAK_TFLOPS * 1e12), "flops_per_token": fpt,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "tokens_per_step_mean": tokens / max(1, len(timed)), "steps_run": len(ends), "warmup": w,
           "case_steps": case.steps, **peak_memory(), **extra,
           "step_ms": [None] + [round(1e3 * (b - a), 2) for a, b in itertools.pairwise(ends)]}  # step 1: no start


def step_clock(device: str, ends: list[float], losses: list[float], on_step: Any = None) -> Any:
    """A `TrainerCallback` appending the end time of every optimizer step (the GPU synchronised) to `ends`,
    every logged training loss to `losses`, and calling `on_step(steps so far)` (a profiler) if given."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if on_step:
                on_step(len(ends))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Clock()
