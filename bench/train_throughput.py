"""Training throughput: HF Trainer + PEFT (naive baseline), TRL + Liger (strong baseline) and fineray's loop.

Method (issues 8 and 17):
  * Models: random-init Llama shapes from config (no hub), or the embedded model's real weights (`smollm2`,
    CPU comparison): `1b` = Llama-3.2-1B (16 layers, d 2048, MLP 8192,
    32/8 heads, vocab 128256, tied embeddings); `8b` = Llama-3-8B (32 layers, d 4096, MLP 14336, 32/8 heads,
    vocab 128256); `tiny` = fineray's tiny:llama shape (CPU comparison). bf16 weights on GPU, seed 0.
  * Adapter: LoRA r=16, alpha=32, dropout 0, all linear layers of the blocks (PEFT `all-linear`).
  * Data: random token ids; lengths `realistic` = lognormal (median 300, sigma 0.8) clipped to [16, 2048],
    or `full` = 2048 each. Every token is a target. All sides see exactly the same batches in the same
    order (the order fineray's sampler draws; the HF sides get them through a sequential sampler).
  * Naive baseline (side `baseline`): `transformers.Trainer` + PEFT, SDPA attention, fused AdamW, constant
    LR 2e-4, bf16, dynamic padding (pad to the longest in the batch), no packing, no gradient checkpointing.
  * Strong baseline (side `strong`, bench/strong_baseline.py): TRL `SFTTrainer` + the same PEFT LoRA,
    padding-free batches (each step's documents in one row, per-document position ids), Liger RMSNorm /
    SwiGLU / RoPE kernels and TRL's chunked LM head, `flex_attention` document masks (sdpa on CPU), same
    optimizer and LR; every run first checks on its own model that the packed forward keeps documents apart
    and refuses otherwise. Liger patches transformers globally: on CUDA the strong side runs in its own
    process (bench/alternate.py runs each side in a resident worker and alternates them).
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
  python bench/train_throughput.py --device cpu --side all --cases tiny-smoke   # naive, strong, fineray
  python bench/train_throughput.py --table b.jsonl f.jsonl               # merge into the ratio table
  python bench/alternate.py ...                                          # median of alternating runs (GPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers: workload, strong_baseline, step_profile

from step_profile import StepProfiler
from workload import (
    CASES,
    SHAPES,
    Case,
    batch_order,
    build_model,
    make_docs,
    peak_memory,
    result_row,
    step_clock,
)


# ------------------------------------------------------------------------------------- naive and strong (HF)
@dataclass
class RunOpts:
    """Per-run options of a side (the worker of bench/alternate.py passes them per command)."""

    overrides: tuple[str, ...] = ()  # fineray config keys
    strong_attn: str = "auto"  # flex_attention | sdpa (both separate documents) | auto: flex on CUDA, sdpa on CPU
    strong_impl: str = "auto"  # trl | hf | auto (trl when it imports)
    liger: bool | None = None  # None: on with CUDA (Liger is Triton-only)
    profile_steps: int = 0  # > 0: a profiled pass of warmup + this many steps (not a timed run)
    warm: bool = False  # only the case's warm-up steps, untimed (compiles, JIT kernels, cuBLAS, allocator)


def _n_steps(case: Case, opts: RunOpts) -> int:
    """Steps of this run: the case's warm-up steps, plus its timed (or profiled) steps unless `warm`."""
    return case.warmup + (0 if opts.warm else min(opts.profile_steps or case.steps, case.steps))


_HF: dict[str, tuple[str, torch.nn.Module, dict[str, torch.Tensor]]] = {}  # side -> (shape, PEFT model, LoRA init)


def drop_models() -> None:
    """Free every cached model of this process (before another shape is built, or on request)."""
    _HF.clear()
    _MODELS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peft_model(side: str, shape: str, device: str) -> torch.nn.Module:
    """The side's LoRA model for `shape`, built once per process and reset to its initial LoRA weights."""
    from peft import LoraConfig, get_peft_model

    if side not in _HF or _HF[side][0] != shape:
        drop_models()
        model = get_peft_model(build_model(shape, device), LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        _HF[side] = (shape, model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    _, model, init = _HF[side]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    model.get_base_model().__dict__.pop("forward", None)  # TRL patches forward per trainer: no chains of them
    return model


def _hf_run(side: str, name: str, case: Case, device: str, opts: RunOpts) -> dict[str, Any]:
    """One run of an HF `Trainer`-based side (naive `baseline` or `strong`) on the bench's documents."""
    from transformers import Trainer, TrainingArguments

    if case.method != "lora":
        raise ValueError(f"the {side} side runs LoRA only")
    vocab = SHAPES[case.shape]["vocab_size"]
    n_full = case.warmup + case.steps
    n_steps = _n_steps(case, opts)
    docs = make_docs(case, n_full * case.batch, vocab)
    order = batch_order(len(docs), case.batch, 42)[:n_steps]
    seq = [docs[i] for b in order for i in b]
    model = _peft_model(side, case.shape, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ends: list[float] = []
    losses: list[float] = []
    prof = StepProfiler(case.warmup, n_steps - case.warmup, device) if opts.profile_steps else None

    clock = step_clock(device, ends, losses, prof.on_step if prof else None)

    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if side == "strong":
            from strong_baseline import (
                apply_liger_now,
                check_document_separation,
                make_collator,
                make_trainer,
                strong_attention,
                strong_impl,
            )

            impl = strong_impl(opts.strong_impl)
            liger = device == "cuda" if opts.liger is None else opts.liger
            attn = opts.strong_attn if opts.strong_attn != "auto" else strong_attention(device)
            model.get_base_model().config._attn_implementation = attn
            trainer = make_trainer(model, seq, case.batch, n_steps, device, tmp, [clock], impl, liger)
            apply_liger_now(trainer)  # what train() applies first; the check below must see the same model
            key = (case.shape, attn, impl, liger)
            if key not in _SEPARATION:
                _SEPARATION[key] = check_document_separation(trainer.model, make_collator(impl), device, vocab)
            sep = _SEPARATION[key]
            if not sep["separates"]:
                raise RuntimeError(f"strong baseline attends across documents ({attn}, {impl}): {sep}")
            extra = {"impl": impl, "attn": attn, "liger": liger, "doc_separation": sep}  # no padding at all
        else:
            class SeqTrainer(Trainer):
                def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
                    return torch.utils.data.SequentialSampler(self.train_dataset)

            class DS(torch.utils.data.Dataset):
                def __len__(self) -> int:
                    return len(seq)

                def __getitem__(self, k: int) -> dict[str, list[int]]:
                    return {"input_ids": seq[k]}

            def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
                n = max(len(r["input_ids"]) for r in rows)
                ids = torch.zeros(len(rows), n, dtype=torch.long)
                mask = torch.zeros(len(rows), n, dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
                    mask[j, :len(r["input_ids"])] = 1
                labels = ids.masked_fill(mask == 0, -100)
                return {"input_ids": ids, "attention_mask": mask, "labels": labels}

            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=case.batch, max_steps=n_steps, learning_rate=2e-4,
                lr_scheduler_type="constant", warmup_steps=0,
                optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", bf16=device == "cuda",
                logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
                gradient_checkpointing=False, remove_unused_columns=False, seed=0,
                disable_tqdm=True, use_cpu=device == "cpu")
            trainer = SeqTrainer(model=model, args=args, train_dataset=DS(), data_collator=collate,
                                 callbacks=[clock])
            extra = {"padded_tokens_per_step":
                     sum(case.batch * max(len(docs[i]) for i in b) for b in order) / n_steps}
        trainer.train()
    out = result_row(side, name, case, docs, order, ends, losses, extra)
    if side == "strong":
        out["compile"] = _compile_counters()  # flex_attention and its block masks are compiled
    if prof:
        out.update(profiled=True, profile=prof.result)
    if opts.warm:
        out["warm"] = True
    del trainer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


_SEPARATION: dict[tuple[Any, ...], dict[str, Any]] = {}


def run_baseline(name: str, case: Case, device: str, opts: RunOpts | None = None) -> dict[str, Any]:
    """HF Trainer + PEFT, dynamic padding, SDPA (the naive baseline)."""
    return _hf_run("baseline", name, case, device, opts or RunOpts())


def run_strong(name: str, case: Case, device: str, opts: RunOpts | None = None) -> dict[str, Any]:
    """TRL SFTTrainer + PEFT, padding-free, Liger, document-separating attention (bench/strong_baseline.py)."""
    return _hf_run("strong", name, case, device, opts or RunOpts())


# -------------------------------------------------------------------------------------------------- fineray
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _fineray_cfg(case: Case, n_steps: int, gpu: bool, opts: RunOpts) -> Any:
    from fineray.train.config import load_config

    return load_config(None, [
        "model.base=tiny:llama", f"method={case.method}", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
        f"train.batch_size={case.batch}", f"train.max_steps={n_steps}", "train.lr=2e-4",
        "train.scheduler=constant", "train.warmup_ratio=0", "train.eval_every=1000000", "train.log_every=1",
        "train.grad_clip=null", "data.validation=null", f"scaling.use_gpu={str(gpu).lower()}",
        "data.max_seq_len=2048", f"train.fast.compile={'auto' if case.compile else 'false'}",
        f"train.optimizer={case.optimizer}", *case.overrides, *opts.overrides])


def _fineray_model(case: Case, device: str, cfg: Any) -> torch.nn.Module:
    """fineray's LoRA model for the case's shape, built once per process (the compiled blocks stay)."""
    from fineray.train.model import apply_peft

    key = (case.shape, case.method)
    if key not in _MODELS:
        drop_models()
        base = build_model(case.shape, device, case.method)
        _MODELS[key] = apply_peft(base, case.method, cfg.lora)
        _MODELS[key]._fineray_init = {n: p.detach().clone() for n, p in _MODELS[key].named_parameters()
                                      if p.requires_grad}
    return _MODELS[key]


def run_fineray(name: str, case: Case, device: str, opts: RunOpts | None = None) -> dict[str, Any]:
    """fineray's training loop in-process with its GPU defaults (packing, varlen attention, compile, ...)."""
    from fineray.train import loop
    from fineray.train.preflight import ModelShape, estimate_memory
    from fineray.train.session import LocalSession
    from fineray.train.templates import Tokenized

    opts = opts or RunOpts()
    vocab = SHAPES[case.shape]["vocab_size"]
    n_full = case.warmup + case.steps
    n_steps = _n_steps(case, opts)
    docs = make_docs(case, n_full * case.batch, vocab)
    order = batch_order(len(docs), case.batch, 42)[:n_steps]  # the loop draws these (same sampler, seed 42)
    gpu = device == "cuda"
    cfg = _fineray_cfg(case, n_steps, gpu, opts)
    model = _fineray_model(case, device, cfg)
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
    prof = StepProfiler(case.warmup, n_steps - case.warmup, device) if opts.profile_steps else None

    class Clocked(LocalSession):
        def progress(self, row: dict[str, Any]) -> None:
            ends.append(time.perf_counter())  # after float(loss) and float(grad_norm): the GPU is in sync
            losses.append(float(row["train_loss"]))
            if prof:
                prof.on_step(len(ends))

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
    out = result_row("fineray", name, case, docs, order, ends, losses,
                  {"estimate_gib": est.total_gib, "estimate_tokens": est.tokens,
                   "estimate_parts_gib": {k: round(v / 2**30, 2) for k, v in est.parts.items()}})
    if "peak_alloc_gib" in out:
        out["measured_over_estimate"] = out["peak_alloc_gib"] / est.total_gib
    out["compile"] = _compile_counters()
    if prof:
        out.update(profiled=True, profile=prof.result)
    if opts.warm:
        out["warm"] = True
    return out


def _compile_counters() -> dict[str, int]:
    """Dynamo's process-wide counters so far (frames compiled, recompiles, graph breaks): per-run deltas
    come from consecutive runs of one worker."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    st = counters.get("stats", {})
    return {"frames_ok": int(st.get("unique_graphs", 0)), "calls_captured": int(st.get("calls_captured", 0)),
            "recompiles": int(sum(counters.get("recompiles", {}).values())),
            "graph_breaks": int(sum(counters.get("graph_break", {}).values()))}


# ----------------------------------------------------------------------------------------------------- table
RUNNERS = {"baseline": run_baseline, "strong": run_strong, "fineray": run_fineray}
SIDE_LABEL = {"baseline": "naive", "strong": "strong", "fineray": "fineray"}


def run_one(side: str, name: str, device: str, opts: RunOpts, tag: str = "") -> dict[str, Any]:
    """One run of one side on one case; failures (OOM, a refused strong baseline, ...) become error rows."""
    case = CASES[name]
    t0 = time.perf_counter()
    try:
        r = RUNNERS[side](name, case, device, opts)
    except Exception as e:  # noqa: BLE001 - record OOMs and failures as rows, keep going
        r = {"side": side, "case": name, "error": f"{type(e).__name__}: {str(e)[:600]}", **peak_memory()}
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    r["wall_s"] = time.perf_counter() - t0
    gc.collect()  # hand the run's cached blocks back: other sides' workers share the GPU (bench/alternate.py)
    if device == "cuda":
        torch.cuda.empty_cache()
    if tag:
        r["case"] = f"{name}+{tag}"
    r["env_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return r


def prepare(side: str, name: str, device: str, opts: RunOpts) -> dict[str, Any]:
    """Import the side's stack and build its model for the case's shape, ahead of the timed runs (the workers
    of bench/alternate.py do this at the same time)."""
    t0 = time.perf_counter()
    case = CASES[name]
    if side == "fineray":
        _fineray_model(case, device, _fineray_cfg(case, case.warmup + case.steps, device == "cuda", opts))
    else:
        _peft_model(side, case.shape, device)
    if side == "strong":
        from strong_baseline import strong_impl

        impl = strong_impl(opts.strong_impl)
        if impl == "trl":
            import trl  # noqa: F401
        if device == "cuda" and opts.liger is not False:
            import liger_kernel.transformers  # noqa: F401
    if device == "cuda":
        torch.cuda.synchronize()
    return {"ok": True, "prepare_s": time.perf_counter() - t0, **peak_memory()}


def serve_worker(side: str, device: str) -> None:
    """Worker mode (bench/alternate.py): keep one side's model (and compiled code) across runs.

    Reads one JSON command per stdin line: {"cmd": "run", "case": NAME, "opts": {...}, "tag": ""},
    {"cmd": "prepare", "case": NAME} (imports, model), {"cmd": "release"} (free the models) or {"cmd": "quit"};
    answers each with one stdout line
    `@@W {json}` (a result row, or {"ok": true}). Everything else on stdout/stderr is log.
    """
    print("@@W " + json.dumps({"ready": side, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "release":
            drop_models()
            reply: dict[str, Any] = {"ok": True, **peak_memory()}
        elif cmd["cmd"] == "prepare":
            try:
                reply = prepare(side, cmd["case"], device, RunOpts(**cmd.get("opts", {})))
            except Exception as e:  # noqa: BLE001 - the coordinator logs it; the run will fail and say why
                reply = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
        else:
            reply = run_one(side, cmd["case"], device, RunOpts(**cmd.get("opts", {})), cmd.get("tag", ""))
        print("@@W " + json.dumps(reply, default=float), flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    """One row per case and side; ratios of useful tok/s and of peak memory against naive and strong."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in [r for r in rows if "error" not in r and not r.get("profiled") and not r.get("warm")]:
        name, _, tag = r["case"].partition("+")
        key = name.replace("-nocompile", "")
        side = SIDE_LABEL.get(r["side"], r["side"]) + ("-nocompile" if "nocompile" in name else "") + \
            (f"+{tag}" if tag else "")
        by.setdefault(key, {})[side] = r
    head = ("| case | side | tok/s (useful) | MFU | peak alloc GiB | tokens/step | x naive | x strong | "
            "mem / naive | mem / strong |")
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(r: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
        if not ref or r is ref or not ref.get(key) or key not in r:
            return ""
        return f"{r[key] / ref[key]:.2f}x"

    for key, sides in by.items():
        naive, strong = sides.get("naive"), sides.get("strong")
        for side, r in sides.items():
            lines.append(f"| {key} | {side} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                         f"{r.get('peak_alloc_gib', float('nan')):.1f} | {r['tokens_per_step_mean']:,.0f} | "
                         f"{ratio(r, naive, 'tokens_per_s')} | {ratio(r, strong, 'tokens_per_s')} | "
                         f"{ratio(r, naive, 'peak_alloc_gib')} | {ratio(r, strong, 'peak_alloc_gib')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side", default="both", choices=["baseline", "strong", "fineray", "both", "all"],
                    help="both = baseline (naive) + fineray; all = naive + strong + fineray")
    ap.add_argument("--cases", default=None, help="comma-separated names from CASES")
    ap.add_argument("--out", default=None, help="append one JSON line per case here")
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these JSONL files and exit")
    ap.add_argument("--set", nargs="*", default=[], help="extra fineray config overrides")
    ap.add_argument("--tag", default="", help="a label appended to the case names of this run (+TAG)")
    ap.add_argument("--strong-attn", default="auto", choices=["auto", "flex_attention", "sdpa"],
                    help="auto: flex_attention on CUDA, sdpa on CPU (PyTorch has no FlexAttention backward on CPU)")
    ap.add_argument("--strong-impl", default="auto", choices=["auto", "trl", "hf"])
    ap.add_argument("--no-liger", action="store_true", help="strong side without Liger (it is off on CPU anyway)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="instead of timed runs: profile this many steps after the warm-up (bench/step_profile.py)")
    ap.add_argument("--worker", action="store_true", help="serve runs of --side over stdin (bench/alternate.py)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the sides alternately this many times and keep each side's fastest run (for shared, "
                         "noisy CPUs)")
    a = ap.parse_args()
    if a.table is not None:
        rows = [json.loads(x) for f in a.table if Path(f).exists() for x in Path(f).read_text().splitlines()
                if x.strip()]
        print(table(rows))
        return
    if a.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    if a.worker:
        serve_worker(a.side, a.device)
        return
    sides = {"both": ["baseline", "fineray"], "all": ["baseline", "strong", "fineray"]}.get(a.side, [a.side])
    opts = RunOpts(overrides=tuple(a.set), strong_attn=a.strong_attn, strong_impl=a.strong_impl,
                   liger=False if a.no_liger else None, profile_steps=a.profile_steps)
    if "strong" in sides and len(sides) > 1 and a.device == "cuda" and not a.no_liger:
        # Liger patches transformers' Llama module globally (RoPE function, RMSNorm/MLP classes): the other
        # sides would run with its kernels. One process per side: bench/alternate.py.
        ap.error("on CUDA the strong side (Liger) needs its own process: use --side strong, or bench/alternate.py")
    names = a.cases.split(",") if a.cases else (["tiny-real16"] if a.device == "cpu" else list(CASES))
    rows = []
    for name in names:
        case = CASES[name]
        best: dict[str, dict[str, Any]] = {}
        for side in sides * a.repeat:
            if side != "fineray" and (case.method != "lora" or "nocompile" in name or case.overrides):
                continue
            r = run_one(side, name, a.device, opts, a.tag)
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
