"""`fineray score`: score conversations with a registered reward model (kind `reward`), offline on Ray Data.

Input lines hold `messages` (a conversation ending in the assistant response to score), or `prompt` +
`response` (strings, or `prompt` as messages); output lines are the input plus `score` and `model`, in input
order. A record that cannot be scored gets an `error` field instead of failing the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fineray.serve.offline import map_lines

__all__ = ["ScoreBatches", "score_offline"]


def _conversation(rec: Any) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise ValueError("each line must be a JSON object")  # a bad record, reported per line
    if isinstance(rec.get("messages"), list):
        return rec["messages"]
    prompt, response = rec.get("prompt"), rec.get("response")
    if isinstance(response, str) and isinstance(prompt, (str, list)):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return turns + [{"role": "assistant", "content": response}]
    raise ValueError("a record needs `messages`, or `prompt` and `response`")


class ScoreBatches:
    """Ray Data callable class: JSON lines in, the same lines with `score` out."""

    def __init__(self, ref: str, registry: str, threads: int, device: str = "cpu", max_batch_size: int = 16) -> None:
        import torch

        from fineray.train.reward_model import RewardScorer

        torch.set_num_threads(threads)
        self.ref = ref
        self.scorer = RewardScorer(ref, registry, device=device, batch_size=max_batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: list[str | None] = [None] * len(batch["text"])
        todo: list[tuple[int, dict[str, Any], list[dict[str, str]]]] = []
        for i, line in enumerate(batch["text"]):
            try:
                rec = json.loads(line)
                todo.append((i, rec, _conversation(rec)))
            except ValueError as e:
                out[i] = json.dumps({"input": str(line)[:200], "error": str(e)})
        if todo:
            for (i, rec, _), s in zip(todo, self.scorer.score([c for _, _, c in todo])):
                out[i] = json.dumps({**rec, "score": s, "model": self.ref})
        return {"text": np.array(out, dtype=object)}


def score_offline(model_ref: str, input_path: str | Path, output_path: str | Path, registry: str = "adapters",
                  num_workers: int = 1, batch_size: int = 16, use_gpu: bool = False) -> dict[str, Any]:
    """Score every line of `input_path` with the reward model `model_ref`; write `output_path` atomically.

    Returns:
        Summary: records, errors, mean score, wall_s, model, output.
    """
    from fineray.train.registry import AdapterRegistry

    t0 = time.perf_counter()
    inp, outp = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise FileNotFoundError(f"input file not found: {inp}")
    version = AdapterRegistry(registry).get(model_ref)  # pin the version; a wrong kind fails in the workers' load
    if version.manifest.get("kind", "adapter") != "reward":
        raise ValueError(f"{version.ref} is not a reward model (train one with objective: reward)")
    lines = [line for line in inp.read_text().splitlines() if line.strip()]
    stats: dict[str, Any] = {"records": 0, "errors": 0}
    scores = []
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = outp.with_name(outp.name + ".partial")
    with tmp.open("w") as f:
        for rec in map_lines(lines, ScoreBatches, {"ref": version.ref, "registry": registry},
                             num_workers=num_workers, batch_size=batch_size, use_gpu=use_gpu):
            stats["records"] += 1
            stats["errors"] += "error" in rec
            if "score" in rec:
                scores.append(rec["score"])
            f.write(json.dumps(rec) + "\n")
    tmp.replace(outp)
    return {**stats, "mean_score": sum(scores) / len(scores) if scores else None,
            "wall_s": round(time.perf_counter() - t0, 2), "model": version.ref, "output": str(outp)}
