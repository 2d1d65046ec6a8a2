"""Generation speed: fineray's engine (static KV slots + CUDA graphs, and the dynamic-cache path) against
PEFT's `generate` with one adapter, on random-weight models of real shapes, in one process.

    # one H200 (bf16): the Llama-1B shape, 32 closed-loop clients, 128 greedy tokens, K = 1, 8, 32 adapters
    python bench/generation.py --shape llama-1b --clients 32 --max-tokens 128 --adapters 1,8,32 \
        --tokenizer .bench/tok --seconds 20 --out $OUT/gen-1b.json

    # CPU smoke run (tiny model, fp32)
    python bench/generation.py --shape tiny --clients 4 --max-tokens 16 --adapters 1,2 --seconds 3

Every client sends requests back to back (closed loop) with `ignore_eos`, so every request yields exactly
`--max-tokens` tokens, spreading them round-robin over K random LoRA adapters (r=16, all linear layers).
Reported per case: completion tok/s, requests/s, p50/p99 latency, p50 time to first token, p50 time per
output token (after the first), mean rows per decode step, wall time per decode step (host + GPU, as the
engine loop sees it) and GPU time per decode step (CUDA events around each graph replay), so the host
overhead left is visible. The PEFT anchor is `PeftModel.generate` on one left-padded batch of `--clients`
prompts, greedy, exactly `--max-tokens` new tokens (the same model weights and adapter files).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["My order #{i} never arrived, can I get a refund? I have been waiting for three weeks now.",
             "The app crashes when I open settings ({i}). I reinstalled it twice and nothing changed.",
             "Please change the billing address on invoice {i} to our new office in Lisbon, Portugal.",
             "How do I reset my password? Ticket {i}. The reset e-mail never arrives in my inbox."]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "tie_word_embeddings": False, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                         "tie_word_embeddings": True, "rope_theta": 100000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048},
}


def build_model(shape: str, device: str) -> Any:
    """A random-weight Llama of `shape` (bf16 on CUDA, fp32 on CPU); std 0.02 linears, unit norms."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def write_adapters(model: Any, k: int, root: Path, r: int = 16) -> list[Path]:
    """K random PEFT LoRA adapters (A ~ N(0, 0.02), B ~ N(0, 0.01)) written straight as PEFT files."""
    import torch
    from safetensors.torch import save_file

    linears = {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    out = []
    for i in range(k):
        g = torch.Generator(device="cpu").manual_seed(1000 + i)
        tensors = {}
        for name, lin in linears.items():
            a = torch.randn((r, lin.in_features), generator=g) * 0.02
            b = torch.randn((lin.out_features, r), generator=g) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(lin.weight.dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(lin.weight.dtype)
        d = root / f"bench-{i}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
            "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": "bench"}))
        out.append(d)
    return out


def make_prompts(tok: Any, n: int) -> list[list[int]]:
    return [tok(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 4].format(i=i)}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def peft_anchor(model: Any, adapter: Path, prompts: list[list[int]], max_tokens: int, reps: int = 2) -> dict:
    """PEFT `generate` with one adapter: one left-padded batch of all prompts, exactly max_tokens new tokens."""
    import torch
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(adapter)).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        times = []
        for _ in range(reps):
            sync(model.device)
            t0 = time.perf_counter()
            out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              **kw)
            sync(model.device)
            times.append(time.perf_counter() - t0)
    new = (out.shape[1] - width) * len(prompts)
    t = statistics.median(times)
    pm.unload()  # the base model's linear layers back, for the engine
    return {"mode": "peft-generate", "adapters": 1, "rows": len(prompts), "tokens_per_s": round(new / t, 1),
            "step_ms": round(1000 * t / max_tokens, 2), "wall_s": round(t, 2)}


def sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load_case(eng: Any, prompts: list[list[int]], names: list[str], clients: int, max_tokens: int,
              seconds: float) -> dict:
    """Closed-loop clients on the in-process engine; per-request latency, TTFT and time per output token."""
    from fineray.serve.engine import GenRequest
    from fineray.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    lat, ttft, tpot = [], [], []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            done = threading.Event()
            first: list[float] = []
            final: list[Any] = []

            def emit(ev: Any, first: list = first, final: list = final, done: threading.Event = done) -> None:
                if not first:
                    first.append(time.perf_counter())
                if ev.finish_reason or ev.error:
                    final.append(ev)
                    done.set()

            t0 = time.perf_counter()
            eng.submit([GenRequest(prompts[i % len(prompts)], params, emit, names[i % len(names)])])
            done.wait()
            t1 = time.perf_counter()
            ev = final[0]
            if ev.error:
                raise RuntimeError(ev.error)
            with lock:
                lat.append(t1 - t0)
                ttft.append(first[0] - t0)
                if ev.tokens > 1:
                    tpot.append((t1 - first[0]) / (ev.tokens - 1))
                tokens[0] += ev.tokens

    steps: list[tuple[int, float]] = []
    eng.on_step = lambda kind, rows, adapters, secs: steps.append((rows, secs)) if kind == "decode" else None
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    eng.on_step = None
    gpu = eng.batch.gpu_step_ms() if getattr(eng.batch, "timing", False) else []
    return {"adapters": len(names), "requests": len(lat), "tokens_per_s": round(tokens[0] / wall, 1),
            "req_per_s": round(len(lat) / wall, 2), "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3),
            "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1), "tpot_p50_ms": round(1000 * pct(tpot, 0.5), 2),
            "rows_per_step": round(statistics.mean(r for r, _ in steps), 1) if steps else 0,
            "decode_wall_ms": round(1000 * statistics.median(s for _, s in steps), 2) if steps else None,
            "loop_ms_per_step": round(1000 * wall / max(1, len(steps)), 2),
            "decode_gpu_ms": round(statistics.median(gpu), 2) if gpu else None}


def run_engine(model: Any, tok: Any, cache: str, adapters: list[Path], ks: list[int], args: argparse.Namespace,
               prompts: list[list[int]]) -> list[dict]:
    from fineray.serve.engine import Engine

    device = "cuda" if args.device == "cuda" else "cpu"
    eng = Engine("bench", device=device, max_batch_size=args.clients, cache=cache.split("-")[0], model=model,
                 tokenizer=tok, threads=args.threads, cuda_graphs=not cache.endswith("-eager"))
    names = []
    t0 = time.perf_counter()
    for i, d in enumerate(adapters[: max(ks)]):
        eng.load_adapter(f"bench-{i}", d)
        names.append(f"bench-{i}")
    print(f"[{cache}] loaded {len(names)} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    out = []
    for k in ks:
        t0 = time.perf_counter()
        load_case(eng, prompts, names[:k], args.clients, args.max_tokens, args.warmup)  # captures graphs
        warm = time.perf_counter() - t0
        if hasattr(eng.batch, "timing"):
            eng.batch.timing = device == "cuda"
            eng.batch.gpu_step_ms() if device == "cuda" else None
        res = {"mode": f"engine-{cache}", **load_case(eng, prompts, names[:k], args.clients, args.max_tokens,
                                                      args.seconds), "warmup_s": round(warm, 1),
               "graphs": getattr(eng.batch, "captures", None)}
        if hasattr(eng.batch, "timing"):
            eng.batch.timing = False
        print(json.dumps(res), flush=True)
        out.append(res)
    eng.close()
    for m in model.modules():  # the engine's LoRA hooks stay on the linears: remove them for the next user
        m._forward_hooks.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: tiny:llama's)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adapters", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--caches", default="static",
                    help="comma list of engine caches: static, static-eager (no CUDA graphs), dynamic")
    ap.add_argument("--other-ks", default="1", help="K values for static-eager and dynamic (slow on GPU)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ks = [int(x) for x in args.adapters.split(",")]
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from fineray.train.config import ModelConfig
        from fineray.train.model import load_tokenizer

        tok = load_tokenizer(ModelConfig(base="tiny:llama"))
    t0 = time.perf_counter()
    model = build_model(args.shape, args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {params / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = make_prompts(tok, 64)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        adapters = write_adapters(model, max(ks), Path(tmp))
        print(f"wrote {len(adapters)} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_peft:
            results.append(peft_anchor(model, adapters[0], prompts[: args.clients], args.max_tokens))
            print(json.dumps(results[-1]), flush=True)
        for cache in args.caches.split(","):
            cks = ks if cache == "static" else [int(x) for x in args.other_ks.split(",")]
            results += run_engine(model, tok, cache, adapters, cks, args, prompts)
    anchor = next((r["tokens_per_s"] for r in results if r["mode"] == "peft-generate"), math.nan)
    print(f"\n{args.shape} ({args.device}), {args.clients} clients, {args.max_tokens} tokens")
    print(f"{'mode':<16}{'K':>4}{'tok/s':>10}{'x PEFT':>8}{'p50 s':>8}{'TTFT ms':>9}{'TPOT ms':>9}{'rows':>6}"
          f"{'wall ms':>9}{'loop ms':>9}{'GPU ms':>8}")
    for r in results:
        print(f"{r['mode']:<16}{r['adapters']:>4}{r['tokens_per_s']:>10}{r['tokens_per_s'] / anchor:>8.2f}"
              f"{r.get('p50_s', '-'):>8}{r.get('ttft_p50_ms', '-'):>9}{r.get('tpot_p50_ms', '-'):>9}"
              f"{r.get('rows_per_step', '-'):>6}{r.get('decode_wall_ms', r.get('step_ms', '-')):>9}"
              f"{r.get('loop_ms_per_step', '-'):>9}{r.get('decode_gpu_ms', '-')!s:>8}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
