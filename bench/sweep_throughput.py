"""Sweep throughput: trials per hour of `fineray tune` with ASHA early stopping vs without (FIFO).

Method:
  * The same sweep twice, one fresh private Ray cluster each: tiny:llama (or --model), LoRA, support tickets,
    `--trials` samples of `--max-steps` optimizer steps, eval (= a report ASHA can act on) every
    `--eval-every` steps, one Ray Train worker per trial, TPE seeded identically (same first trials).
  * ASHA: time_attr=step, grace period = one eval interval, reduction factor `--rf`, max_t = max steps.
  * Wall time = `run_sweep` from start to result (Ray start, every trial, registering the winner).
    trials/hour = trials / wall hours; steps = optimizer steps actually run (sum over trials).
  * CPU: each trial = 0.01 CPU (Tune driver) + 0.99 CPU (worker), so concurrency = cluster CPUs.
    GPU (--device cuda): each worker takes `--gpus-per-trial` of a GPU (fractional, e.g. 0.25 -> 4 trials
    per GPU) and 1 CPU; concurrency = min(GPUs // fraction, CPUs // 1.01).

Usage:
  python bench/sweep_throughput.py                                  # CPU, tiny model, 6 trials x 12 steps
  python bench/sweep_throughput.py --trials 8 --max-steps 20 --num-cpus 2
  python bench/sweep_throughput.py --device cuda --gpus-per-trial 0.25 --trials 16 --max-steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep_config(args: argparse.Namespace, scheduler: str, root: Path) -> Any:
    from fineray.train.config import load_config

    overrides = [
        f"model.base={args.model}", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "data.train=fineray:support-tickets", "data.validation=fineray:support-tickets/val", "data.format=alpaca",
        f"data.max_seq_len={args.max_seq_len}", f"train.max_steps={args.max_steps}", f"train.batch_size={args.batch_size}",
        f"train.eval_every={args.eval_every}", "train.eval_batches=2", "train.warmup_ratio=0.0", "train.seed=1",
        f"train.log_every={args.max_steps}", "scaling.num_workers=1", "eval.enabled=false",
        f"output.dir={root / 'runs'}", f"output.registry={root / 'adapters'}", f"output.name={scheduler}",
    ]
    if args.num_cpus:
        overrides.append(f"cluster.num_cpus={args.num_cpus}")
    if args.device == "cuda":
        overrides += ["scaling.use_gpu=true", f"scaling.resources_per_worker={{GPU: {args.gpus_per_trial}, CPU: 1}}"]
    cfg = load_config(None, overrides)
    sched = {"type": "none"} if scheduler == "fifo" else {"type": "asha", "time_attr": "step",
                                                          "grace_period": args.eval_every, "reduction_factor": args.rf}
    cfg.tune = {"metric": "val_loss", "mode": "min", "num_samples": args.trials, "seed": 0, "scheduler": sched,
                "plots": False, "search_space": {"train.lr": {"loguniform": [1.0e-5, 3.0e-2]},
                                                 "lora.r": {"choice": [4, 8, 16]}}}
    return cfg


def run_one(args: argparse.Namespace, scheduler: str, root: Path) -> dict[str, Any]:
    from fineray.tune import run_sweep

    cfg = sweep_config(args, scheduler, root)
    t0 = time.perf_counter()
    res = run_sweep(cfg, progress=not args.quiet)
    wall = time.perf_counter() - t0
    steps = sum(int(r["step"] or 0) for r in res.trials)
    return {"scheduler": scheduler, "trials": len(res.trials), "wall_s": round(wall, 1),
            "trials_per_hour": round(len(res.trials) / wall * 3600, 1),
            "early_stopped": sum(r["early_stopped"] for r in res.trials), "errors": len(res.errors),
            "steps_run": steps, "steps_budget": args.trials * args.max_steps,
            "best_val_loss": round(res.best["metrics"]["val_loss"], 4) if res.best else None,
            "best_trial": res.best.get("trial_id")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--rf", type=float, default=2.0, help="ASHA reduction factor")
    ap.add_argument("--gpus-per-trial", type=float, default=0.25, help="GPU fraction per trial (--device cuda)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private Ray cluster (default: all)")
    ap.add_argument("--schedulers", default="asha,fifo")
    ap.add_argument("--out", type=Path, default=None, help="also append the rows as JSON lines here")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args()

    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fineray-sweep-bench-") as tmp:
        for sched in args.schedulers.split(","):
            rows.append(run_one(args, sched, Path(tmp)))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sweep throughput: {args.model} on {args.device}, {args.trials} trials x {args.max_steps} steps")
    for col in rows[0]:
        t.add_column(col)
    for r in rows:
        t.add_row(*[str(v) for v in r.values()])
    console = Console()
    console.width = max(console.width, 150)  # the full table also when the output is a file
    console.print(t)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": args.device, "model": args.model, "max_steps": args.max_steps,
                                    "eval_every": args.eval_every}) + "\n")


if __name__ == "__main__":
    main()
