"""Training throughput: HF Trainer + PEFT (baseline) vs fineray's training loop, same shapes, same data.

Method (issue 8):
  * Models: random-init Llama shapes from config (no hub), or the embedded model's real weights (`smollm2`,
    CPU comparison): `1b` = Llama-3.2-1B (16 layers, d 2048, MLP 8192,
    32/8 heads, vocab 128256, tied embeddings); `8b` = Llama-3-8B (32 layers, d 4096, MLP 14336, 32/8 heads,
    vocab 128256); `tiny` = fineray's tiny:llama shape (CPU comparison). bf16 weights on GPU, seed 0.
  * Adapter: LoRA r=16, alpha=32, dropout 0, all linear layers of the blocks (PEFT `all-linear`).
  * Data: random token ids; lengths `realistic` = lognormal (median 300, sigma 0.8) clipped to [16, 2048],
    or `full` = 2048 each. Every token is a target. Both sides see exactly the same batches in the same
    order (the order fineray's sampler draws; the baseline gets them through a sequential sampler).
  * Baseline: `transformers.Trainer` + PEFT, SDPA attention, fused AdamW, constant LR 2e-4, bf16, dynamic
    padding (pad to the longest in the batch), no packing, no gradient checkpointing.
  * fineray: `fineray.train.loop.train_loop` in-process (LocalSession) with its defaults for GPU: packing
    (one row per micro-batch, per-document positions, varlen flash attention), chunked cross-entropy,
    per-block `torch.compile`. Model and data loading are replaced by the same random model and documents.
  * Timing: wall clock between the ends of consecutive optimizer steps (the GPU is synchronised there by
    the loss read-out), over the steps after `--warmup`; tokens = non-padding tokens of those steps
    ("useful tokens"). Peak memory = `torch.cuda.max_memory_allocated` over the run (and reserved).
  * MFU = model FLOPs per useful token x tokens/s / 790 TFLOP/s (the bf16 matmul rate measured on the
    H200). Model FLOPs per token = 2 x N_mm x (2 for LoRA: forward + activation gradients; 3 for full
    fine-tuning: + weight gradients) + attention 4 x L x d_q x c x 3 (QK^T and AV, forward + 2x backward),
    where N_mm = matmul parameters (blocks + output head) and c = mean causal context of a token within its
    own document (sum n_i^2 / 2 / sum n_i). Padding and cross-document attention are not counted.

Usage:
  python bench/train_throughput.py --device cpu                          # tiny model, both sides, table
  python bench/train_throughput.py --device cuda --side baseline --cases 1b-real16,1b-full8 --out b.jsonl
  python bench/train_throughput.py --device cuda --side fineray --cases 1b-real16 --out f.jsonl
  python bench/train_throughput.py --table b.jsonl f.jsonl               # merge into the ratio table
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def _mem() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _result(side: str, name: str, case: Case, docs: list[list[int]], order: list[list[int]],
            ends: list[float], losses: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    w = case.warmup
    timed = order[w:len(ends)]
    tokens = sum(len(docs[i]) for b in timed for i in b)
    secs = ends[-1] - ends[w - 1] if len(ends) > w else float("nan")
    tps = tokens / secs if secs > 0 else float("nan")
    used = [docs[i] for b in order[:len(ends)] for i in b]
    fpt = flops_per_token(case.shape, used, case.method)
    out = {"side": side, "case": name, "shape": case.shape, "batch": case.batch, "lengths": case.lengths,
           "method": case.method, "steps_timed": len(timed), "tokens_timed": tokens, "seconds": secs,
           "tokens_per_s": tps, "mfu": fpt * tps / (PEAK_TFLOPS * 1e12), "flops_per_token": fpt,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "tokens_per_step_mean": tokens / max(1, len(timed)), **_mem(), **extra}
    return out


def step_clock(device: str, ends: list[float], losses: list[float]) -> Any:
    """A `TrainerCallback` appending the end time of every optimizer step (the GPU synchronised) to `ends`
    and every logged training loss to `losses`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Clock()


# ------------------------------------------------------------------------------------------------- baseline
def run_baseline(name: str, case: Case, device: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    if case.method != "lora":
        raise ValueError("the baseline runs LoRA only")
    cfgv = SHAPES[case.shape]["vocab_size"]
    n_steps = case.warmup + case.steps
    docs = make_docs(case, n_steps * case.batch, cfgv)
    order = batch_order(len(docs), case.batch, 42)[:n_steps]
    seq = [i for b in order for i in b]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(case.shape, device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(seq)

        def __getitem__(self, k: int) -> dict[str, list[int]]:
            return {"input_ids": docs[seq[k]]}

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[j, :len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    ends: list[float] = []
    losses: list[float] = []

    class SeqTrainer(Trainer):
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=case.batch, max_steps=n_steps, learning_rate=2e-4,
            lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=device == "cuda",
            logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
            gradient_checkpointing=False, remove_unused_columns=False, seed=0,
            disable_tqdm=True, use_cpu=device == "cpu")
        trainer = SeqTrainer(model=model, args=args, train_dataset=DS(), data_collator=collate,
                             callbacks=[step_clock(device, ends, losses)])
        trainer.train()
    pad = {"padded_tokens_per_step": sum(case.batch * max(len(docs[i]) for i in b) for b in order) / n_steps}
    out = _result("baseline", name, case, docs, order, ends, losses, pad)
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------------------------------- fineray
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def run_fineray(name: str, case: Case, device: str, overrides: list[str] | None = None) -> dict[str, Any]:
    from fineray.train import loop
    from fineray.train.config import load_config
    from fineray.train.model import apply_peft
    from fineray.train.preflight import ModelShape, estimate_memory
    from fineray.train.session import LocalSession
    from fineray.train.templates import Tokenized

    vocab = SHAPES[case.shape]["vocab_size"]
    n_steps = case.warmup + case.steps
    docs = make_docs(case, n_steps * case.batch, vocab)
    order = batch_order(len(docs), case.batch, 42)[:n_steps]
    gpu = device == "cuda"
    cfg = load_config(None, [
        "model.base=tiny:llama", f"method={case.method}", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
        f"train.batch_size={case.batch}", f"train.max_steps={n_steps}", "train.lr=2e-4",
        "train.scheduler=constant", "train.warmup_ratio=0", "train.eval_every=1000000", "train.log_every=1",
        "train.grad_clip=null", "data.validation=null", f"scaling.use_gpu={str(gpu).lower()}",
        "data.max_seq_len=2048", f"train.fast.compile={'auto' if case.compile else 'false'}",
        f"train.optimizer={case.optimizer}", *case.overrides, *(overrides or [])])
    key = (case.shape, case.method)
    if key not in _MODELS:
        _MODELS.clear()
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        base = build_model(case.shape, device, case.method)
        _MODELS[key] = apply_peft(base, case.method, cfg.lora)
        _MODELS[key]._fineray_init = {n: p.detach().clone() for n, p in _MODELS[key].named_parameters()
                                      if p.requires_grad}
    model = _MODELS[key]
    with torch.no_grad():  # every case starts from the same LoRA initialisation
        for n, p in model.named_parameters():
            if n in model._fineray_init:
                p.copy_(model._fineray_init[n])
    if not case.compile:
        for mod in model.modules():
            if getattr(mod, "_compiled_call_impl", None) is not None:
                mod._compiled_call_impl = None

    class Tok:
        pad_token_id = 0

    data = [Tokenized(d, list(d)) for d in docs]
    loop.load_for_training = lambda cfg, **kw: (Tok(), model)
    loop.build_data = lambda cfg, tok, stats=None: (data, [])
    ends: list[float] = []
    losses: list[float] = []

    class Clocked(LocalSession):
        def progress(self, row: dict[str, Any]) -> None:
            ends.append(time.perf_counter())  # after float(loss) and float(grad_norm): the GPU is in sync
            losses.append(float(row["train_loss"]))

        def report(self, metrics: dict[str, Any], write_checkpoint: Any = None) -> None:
            self.reports.append(dict(metrics))  # no checkpoint files in a benchmark

    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        loop.train_loop(cfg, Clocked(tmp, device=device))
    s = SHAPES[case.shape]
    shape = ModelShape(s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], vocab,
                       s["num_attention_heads"], s["num_key_value_heads"],
                       s.get("head_dim", s["hidden_size"] // s["num_attention_heads"]), s["tie_word_embeddings"])
    worst = max(sum(len(docs[i]) for i in b) for b in order)
    est = estimate_memory(cfg, shape, tokens=-(-worst // 8) * 8)
    out = _result("fineray", name, case, docs, order, ends, losses,
                  {"estimate_gib": est.total_gib, "estimate_tokens": est.tokens,
                   "estimate_parts_gib": {k: round(v / 2**30, 2) for k, v in est.parts.items()}})
    if "peak_alloc_gib" in out:
        out["measured_over_estimate"] = out["peak_alloc_gib"] / est.total_gib
    return out


# ----------------------------------------------------------------------------------------------------- table
def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in [r for r in rows if "error" not in r]:
        name, _, tag = r["case"].partition("+")
        key = name.replace("-nocompile", "")
        side = r["side"] + ("-nocompile" if "nocompile" in name else "") + (f"+{tag}" if tag else "")
        by.setdefault(key, {})[side] = r
    lines = ["| case | side | tok/s (useful) | MFU | peak alloc GiB | tokens/step | ratio tok/s | ratio mem |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, sides in by.items():
        base = sides.get("baseline")
        for side, r in sides.items():
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and side != "baseline" else None
            mem = (r.get("peak_alloc_gib", 0) / base["peak_alloc_gib"]
                   if base and side != "baseline" and base.get("peak_alloc_gib") else None)
            lines.append(f"| {key} | {side} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                         f"{r.get('peak_alloc_gib', float('nan')):.1f} | {r['tokens_per_step_mean']:,.0f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if mem is None else f'{mem:.2f}x'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side", default="both", choices=["baseline", "fineray", "both"])
    ap.add_argument("--cases", default=None, help="comma-separated names from CASES")
    ap.add_argument("--out", default=None, help="append one JSON line per case here")
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these JSONL files and exit")
    ap.add_argument("--set", nargs="*", default=[], help="extra fineray config overrides")
    ap.add_argument("--tag", default="", help="a label appended to the case names of this run (+TAG)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the sides alternately this many times and keep each side's fastest run (for shared, "
                         "noisy CPUs)")
    a = ap.parse_args()
    if a.table is not None:
        rows = [json.loads(x) for f in a.table if Path(f).exists() for x in Path(f).read_text().splitlines()
                if x.strip()]
        print(table(rows))
        return
    names = a.cases.split(",") if a.cases else (["tiny-real16"] if a.device == "cpu" else list(CASES))
    if a.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rows = []
    for name in names:
        case = CASES[name]
        best: dict[str, dict[str, Any]] = {}
        for side in (["baseline", "fineray"] if a.side == "both" else [a.side]) * a.repeat:
            if side == "baseline" and (case.method != "lora" or "nocompile" in name or case.overrides):
                continue
            t0 = time.perf_counter()
            try:
                r = (run_baseline if side == "baseline" else run_fineray)(name, case, a.device,
                                                                         *([a.set] if side == "fineray" else []))
            except Exception as e:  # noqa: BLE001 - record OOMs and failures as rows, keep going
                r = {"side": side, "case": name, "error": f"{type(e).__name__}: {str(e)[:300]}",
                     **_mem()}
                gc.collect()
                if a.device == "cuda":
                    torch.cuda.empty_cache()
            r["wall_s"] = time.perf_counter() - t0
            if a.tag:
                r["case"] = f"{name}+{a.tag}"
            r["env_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
            print("RESULT " + json.dumps(r, default=float), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r, default=float) + "\n")
            if "error" not in r and r["tokens_per_s"] > best.get(side, {}).get("tokens_per_s", -1):
                best[side] = r
        rows.extend(best.values())
    print(table(rows))


if __name__ == "__main__":
    main()
