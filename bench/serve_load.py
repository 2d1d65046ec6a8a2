"""Load test of `fineray serve`: N concurrent clients spread over K adapters, mixed-adapter batching vs
one request at a time.

    # CPU, over HTTP on loopback (starts the real server twice: batched, then max_batch_size=1)
    python bench/serve_load.py --clients 8 --requests 48 --adapters 1,4,16 --max-tokens 16

    # GPU, the engine in-process (no Ray needed): a SmolLM2-135M-shaped model (random weights) in bf16
    python bench/serve_load.py --mode engine --gpu --base /path/to/model-dir --random-weights \
        --clients 64 --requests 512 --adapters 1,8,32 --max-tokens 64 --max-batch-size 64

Every client sends its requests back to back (closed loop), picking adapters round-robin so all K adapters
are in flight together. Adapters are random LoRA (r=16, all linear layers, non-zero B). Reports per
(mode, K): requests/s, completion tokens/s, latency p50/p99. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["My order #{i} never arrived, can I get a refund?", "The app crashes when I open settings ({i}).",
             "Please change the billing address on invoice {i}.", "How do I reset my password? Ticket {i}."]


def make_base(base: str, random_weights: bool) -> str:
    """A base spec; with random weights, a copy of a config+tokenizer folder filled with random weights (the
    GPU bench: same shapes and cost as the real model, nothing large to carry)."""
    src = Path(base)
    if not random_weights:
        return base
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dst = Path(tempfile.gettempdir()) / f"fineray-bench-{src.name}"
    if not (dst / "model.safetensors").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst)).save_pretrained(dst)
    return str(dst)


def make_adapters(base: str, k: int, root: Path, r: int = 16) -> list[str]:
    """K random LoRA adapters registered as bench-0..bench-{k-1} in a registry at `root`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fineray.train.config import ModelConfig
    from fineray.train.model import load_base_model
    from fineray.train.registry import AdapterRegistry

    reg = AdapterRegistry(str(root))
    model = get_peft_model(load_base_model(ModelConfig(base=base)),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    names = []
    for i in range(k):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.02 if "lora_A" in n else 0.01)
        out = root.parent / f"src-{i}"
        model.save_pretrained(out)
        reg.register(f"bench-{i}", out, base_model=base, method="lora")
        names.append(f"bench-{i}")
    return names


def summarize(mode: str, k: int, latencies: list[float], tokens: int, wall: float) -> dict[str, Any]:
    lat = sorted(latencies) or [float("nan")]
    return {"mode": mode, "adapters": k, "requests": len(lat), "wall_s": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}


# ---------------------------------------------------------------------------------------------- HTTP mode
async def http_load(url: str, names: list[str], clients: int, requests: int, max_tokens: int,
                    max_seconds: float = 1e9) -> tuple[list, int]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    counter = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": names[i % len(names)], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[i % 4].format(i=i)}]}
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return latencies, tokens


def run_http(args: argparse.Namespace, base: str, registry: Path, names: list[str]) -> list[dict[str, Any]]:
    from fineray.serve import load_serve_config, run_server

    results = []
    modes = (("batched", args.max_batch_size),) if args.batched_only else (("batched", args.max_batch_size),
                                                                           ("one-at-a-time", 1))
    for mode, batch in modes:
        t0 = time.perf_counter()
        cfg = load_serve_config(None, {"base": base, "registry": str(registry), "port": args.port, "engine": args.engine,
                                       "max_adapters_per_replica": max(args.adapters),
                                       "batching": {"max_batch_size": batch, "max_ongoing_requests": 256},
                                       "limits": {"max_tokens": args.max_tokens}, "ray": {"num_cpus": 2},
                                       "num_cpus_per_replica": args.threads})
        with run_server(cfg, blocking=False) as srv:
            print(f"[{args.engine}] server up in {time.perf_counter() - t0:.1f} s", flush=True)
            for k in args.adapters:
                ks = names[:k]
                asyncio.run(http_load(srv.url, ks, min(args.clients, len(ks) * 2), len(ks) * 2, 4))  # load all
                t0 = time.perf_counter()
                lat, tok = asyncio.run(http_load(srv.url, ks, args.clients, args.requests, args.max_tokens,
                                                 args.max_seconds))
                results.append(summarize(f"{args.engine}-{mode}", k, lat, tok, time.perf_counter() - t0))
                print(json.dumps(results[-1]), flush=True)
    return results


# ---------------------------------------------------------------------------------------------- engine mode
def engine_load(eng: Any, prompts: list[list[int]], params: Any, names: list[str], clients: int,
                requests: int, max_seconds: float) -> tuple[list[float], int]:
    """`clients` threads, each generating one request at a time until `requests` are done or time is up."""
    latencies: list[float] = []
    tokens = [0]
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            c = eng.generate([prompts[i % len(prompts)]], params, [names[i % len(names)]])[0]
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += c.completion_tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, tokens[0]


def run_engine(args: argparse.Namespace, base: str, registry: Path, names: list[str]) -> list[dict[str, Any]]:
    from fineray.serve.engine import Engine
    from fineray.serve.sampling import SamplingParams
    from fineray.train.registry import AdapterRegistry

    reg = AdapterRegistry(str(registry))
    results = []
    for mode, batch in (("batched", args.max_batch_size), ("one-at-a-time", 1)):
        eng = Engine(base, device="cuda" if args.gpu else "cpu", max_batch_size=batch, threads=args.threads)
        for n in names[:max(args.adapters)]:
            eng.load_adapter(n, reg.local_path(n))
        tok = eng.tokenizer
        prompts = [tok(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 4].format(i=i)}],
                                               tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"] for i in range(64)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        eng.generate(prompts[:2], params, names[:2])  # warm-up (CUDA context, kernels)
        for k in args.adapters:
            t0 = time.perf_counter()
            latencies, tokens = engine_load(eng, prompts, params, names[:k], args.clients, args.requests,
                                            args.max_seconds)
            results.append(summarize(mode, k, latencies, tokens, time.perf_counter() - t0))
            print(json.dumps(results[-1]), flush=True)
        eng.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["http", "engine"], default="http")
    ap.add_argument("--gpu", action="store_true", help="engine mode on CUDA (bf16)")
    ap.add_argument("--base", default="tiny:llama")
    ap.add_argument("--random-weights", action="store_true", help="base is a folder with config+tokenizer only")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="requests per (mode, K)")
    ap.add_argument("--adapters", default="1,4,16", help="comma-separated K values")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="stop starting requests after this (per case)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin",
                    help="serve.engine (vllm: run this script with .venv-vllm/bin/python)")
    ap.add_argument("--batched-only", action="store_true", help="skip the one-request-at-a-time server")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.adapters = [int(x) for x in args.adapters.split(",")]
    if args.mode == "http" and args.gpu:
        ap.error("--gpu runs in engine mode (--mode engine)")

    base = make_base(args.base, args.random_weights)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        names = make_adapters(base, max(args.adapters), Path(tmp) / "registry")
        print(f"made {len(names)} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
        results = (run_http if args.mode == "http" else run_engine)(args, base, Path(tmp) / "registry", names)
    print(f"\n{'mode':<14}{'K':>4}{'req/s':>9}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}")
    for r in results:
        print(f"{r['mode']:<14}{r['adapters']:>4}{r['req_per_s']:>9}{r['tokens_per_s']:>9}{r['p50_s']:>8}{r['p99_s']:>8}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))


if __name__ == "__main__":
    main()
