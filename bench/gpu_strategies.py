"""Sharded and multi-GPU training through Ray Train: DDP scaling, FSDP and ZeRO-3 with resume.

Each run is fineray's real path: `launcher.make_trainer` (Ray Train TorchTrainer, one worker per GPU)
running `loop.ray_worker_entry`. Resume runs restart from the first checkpoint of the first run (its
folder passed as `resume_from` in train_loop_config: Ray Train V2 refuses resume_from_checkpoint) and must
give the same losses for the steps after it.

Runs (`--runs`, comma-separated):
  ddp1, ddp2      LoRA r=16 (all linear), 1 and 2 workers, the GPU fast path, same per-worker batch:
                  tokens/s (all workers, median over steps after the first `--warmup`) and the ratio
  fsdp            FSDP2 full fine-tune, 2 workers, checkpoint every `--ckpt` steps, then resume
  zero3 / zero2   DeepSpeed ZeRO-3 / ZeRO-2 full fine-tune, 2 workers, then resume
  zero3off        ZeRO-3 with the optimizer state and the parameters offloaded to CPU memory, then resume
  qlora_ddp2      QLoRA (NF4 base, bf16 LoRA), 2 workers under DDP (no resume)
  qlora_fsdp      QLoRA under FSDP2, 2 workers (the 4-bit base replicated, LoRA sharded), then resume

Model: `--shape 1b` builds a random-init Llama-3.2-1B-shaped model (bf16 safetensors) with fineray's tiny
tokenizer (its 512 ids are valid in the 128k vocabulary) in a local folder; `--shape tiny` uses tiny:llama
(CPU). Data (`--data`): `tickets` = the built-in support-tickets set (short documents); `realistic` =
random-word documents with lognormal lengths (median ~300 tokens, sigma 0.8, the issue's realistic shape).
Usage: python bench/gpu_strategies.py --shape 1b --runs ddp1,ddp2,zero3,fsdp --out $OUT/strategies.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def build_1b(out: Path) -> str:
    """A random-init Llama-3.2-1B shape with the tiny tokenizer, saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fineray.train._tiny import tiny_model_dir

    if (out / "model.safetensors").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096, rope_theta=500000.0, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def realistic_data(out: Path, n: int = 4000, seed: int = 0) -> str:
    """`n` text documents of random words, lengths lognormal (median ~300 tokens, sigma 0.8), as JSONL."""
    import math
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
             for _ in range(2000)]
    with open(out, "w") as f:
        for _ in range(n):
            k = int(min(900, max(8, round(150 * math.exp(0.8 * rng.gauss(0, 1))))))  # ~2 tokens a word
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(k))}) + "\n")
    return str(out)


def run_config(base: str, run: str, gpu: bool, args: argparse.Namespace) -> list[str]:
    data = [f"data.train={args.data_path}", "data.format=text", "data.max_seq_len=2048"] \
        if args.data_path else ["data.max_seq_len=1024"]
    common = [f"model.base={base}", "data.validation=null", "eval.enabled=false", "train.log_every=1",
              "train.eval_every=1000000", "train.scheduler=constant", "train.warmup_ratio=0",
              f"scaling.use_gpu={str(gpu).lower()}", "output.register_adapter=false",
              "train.fast.expandable_segments=false", *data]
    if run.startswith("qlora"):
        strat = ["train.strategy=fsdp"] if run.endswith("fsdp") else []
        return common + strat + ["method=qlora", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
                                 f"train.batch_size={args.batch}", f"train.max_steps={2 * args.ckpt}",
                                 f"train.checkpoint_every={args.ckpt}", "scaling.num_workers=2",
                                 "train.lr=2e-4"]
    if run.startswith("ddp"):
        return common + ["method=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
                         f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                         f"scaling.num_workers={run[-1]}", "train.lr=2e-4"]
    strat = {"fsdp": ["train.strategy=fsdp"], "zero3": ["train.strategy=deepspeed", "train.deepspeed.stage=3"],
             "zero2": ["train.strategy=deepspeed", "train.deepspeed.stage=2"],
             "zero3off": ["train.strategy=deepspeed", "train.deepspeed.stage=3",
                          "train.deepspeed.offload_optimizer=true", "train.deepspeed.offload_params=true"]}[run]
    return common + strat + ["method=full", f"train.batch_size={args.full_batch}",
                             f"train.max_steps={2 * args.ckpt}", f"train.checkpoint_every={args.ckpt}",
                             "scaling.num_workers=2", "train.lr=1e-5", "train.fast.compile=false"]


def fit(cfg: Any, storage: Path, resume: Any = None) -> Any:
    """`launcher.make_trainer(...).fit()`; with `resume`, the same trainer restarted from that checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from fineray.train.launcher import make_trainer
    from fineray.train.loop import ray_worker_entry

    if resume is None:
        return make_trainer(cfg, storage, storage_path=str(storage)).fit()
    sc = cfg.scaling
    return TorchTrainer(  # make_trainer's arguments plus the checkpoint to resume from, under a fresh run name
        ray_worker_entry, train_loop_config={"run": cfg.to_dict(), "adapter_path": None, "progress_board": None,
                                             "resume_from": resume.path},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=None if sc.use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name="resume", storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))).fit()


def history(result: Any) -> list[dict[str, Any]]:
    with result.checkpoint.as_directory() as d:
        return [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "1b"])
    ap.add_argument("--runs", default="ddp1,ddp2,zero3,fsdp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--full-batch", type=int, default=8)
    ap.add_argument("--ckpt", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--data", default="tickets", choices=["tickets", "realistic"])
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip runs that would start after this")
    a = ap.parse_args()
    import ray
    import torch

    from fineray.train.config import load_config
    from fineray.train.preflight import estimate_memory, model_shape

    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fineray-strat-"))
    base = build_1b(work / "llama-1b") if a.shape == "1b" else "tiny:llama"
    a.data_path = realistic_data(work / "realistic.jsonl") if a.data == "realistic" else None
    ray.init(address="local", num_cpus=a.num_cpus or max(2, (os.cpu_count() or 2)), include_dashboard=False)
    rows: list[dict[str, Any]] = []
    for run in a.runs.split(","):
        if time.perf_counter() - t_start > a.deadline_s:
            print(f"SKIP {run}: past the deadline", flush=True)
            continue
        cfg = load_config(None, run_config(base, run, gpu, a))
        storage = work / run
        row: dict[str, Any] = {"run": run, "shape": a.shape, "workers": cfg.scaling.num_workers,
                               "strategy": cfg.train.strategy, "method": cfg.method}
        t0 = time.perf_counter()
        try:
            res = fit(cfg, storage)
            hist = history(res)
            row["losses"] = [round(r["train_loss"], 5) for r in hist]
            tps = [r["tokens_per_s"] for r in hist if "tokens_per_s" in r][a.warmup:]
            row["tokens_per_s_median"] = statistics.median(tps) if tps else None
            row["peak_mem_gib_rank0"] = max((r.get("peak_mem_gib", 0) for r in hist), default=None)
            shape = model_shape(base)
            if shape is not None:
                row["estimate_gib"] = round(estimate_memory(cfg, shape).total_gib, 2)
            if not run.startswith("ddp") and run != "qlora_ddp2":
                first = min(res.best_checkpoints, key=lambda c: c[1]["step"])
                row["resume_from_step"] = first[1]["step"]
                with first[0].as_directory() as d:
                    row["checkpoint_files"] = sorted(str(p.relative_to(d)) for p in Path(d).rglob("*")
                                                     if p.is_file())[:40]
                res2 = fit(cfg, storage, resume=first[0])
                h2 = history(res2)
                row["resumed_steps"] = [r["step"] for r in h2]
                row["resumed_losses"] = [round(r["train_loss"], 5) for r in h2]
                k = first[1]["step"]
                ref = [r["train_loss"] for r in hist if r["step"] > k]
                new = [r["train_loss"] for r in h2 if r["step"] > k]
                row["resume_max_abs_diff"] = max(abs(x - y) for x, y in zip(ref, new)) if new else None
                with res2.checkpoint.as_directory() as d:
                    row["final_weights"] = sorted(p.name for p in Path(d).iterdir())
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the next run
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[-600:]}"
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    by = {r["run"]: r for r in rows}
    if by.get("ddp1", {}).get("tokens_per_s_median") and by.get("ddp2", {}).get("tokens_per_s_median"):
        print(f"SCALING 2 workers / 1 worker: {by['ddp2']['tokens_per_s_median'] / by['ddp1']['tokens_per_s_median']:.2f}x",
              flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
