"""`fineray generate`: offline batch generation over a JSONL file with Ray Data, across workers.

Input lines are JSON objects with either `messages` (OpenAI chat messages; the chat template is applied) or
`prompt` (raw text), plus optional per-record `max_tokens`, `temperature`, `top_p`, `stop`, `seed`.
Output lines are the input record plus `output`, `finish_reason`, `usage` and `model` (the exact adapter
version), in input order; a record that cannot be processed gets an `error` field instead of failing the
run. Each worker (a Ray Data actor) loads the base model and the adapter once and generates its batches
with the same batched engine as the server.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fineray.serve.config import BASE_ALIAS
from fineray.train.config import EMBEDDED_MODEL

__all__ = ["BatchGenerator", "generate_offline", "map_lines", "resolve_model"]

_OVERRIDES = ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


class BatchGenerator:
    """Ray Data callable class: JSON lines in (`text` column), JSON lines out."""

    def __init__(self, base: str, adapter_path: str | None, adapter_ref: str | None, defaults: dict[str, Any],
                 threads: int, device: str = "auto", max_batch_size: int = 16):
        from fineray.serve.engine import BASE, Engine

        self.engine = Engine(base, device=device, threads=threads, max_batch_size=max_batch_size)
        self.key = adapter_ref or BASE
        if adapter_path:
            self.engine.load_adapter(self.key, adapter_path)
        self.model = adapter_ref or base
        self.defaults = defaults

    def _prompt(self, rec: dict[str, Any]) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(rec.get("messages"), list):
            text = tok.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(rec.get("prompt"), str):
            return tok(rec["prompt"])["input_ids"]
        raise ValueError("a record needs `messages` (list) or `prompt` (string)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fineray.serve.sampling import SamplingParams

        lines = list(batch["text"])
        out: list[str | None] = [None] * len(lines)
        todo: list[tuple[int, dict[str, Any], list[int], SamplingParams]] = []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError as e:
                out[i] = json.dumps({"input": str(line)[:200], "error": f"invalid JSON: {e}"})
                continue
            if not isinstance(rec, dict):
                out[i] = json.dumps({"input": rec, "error": "each line must be a JSON object"})
                continue
            try:
                ids = self._prompt(rec)
                params = {**self.defaults, **{k: rec[k] for k in _OVERRIDES if k in rec}}
                if isinstance(params.get("stop"), str):
                    params["stop"] = [params["stop"]]
                room = self.engine.max_context - len(ids)
                if room < 1:
                    raise ValueError(f"prompt of {len(ids)} tokens exceeds the context ({self.engine.max_context})")
                params["max_tokens"] = min(int(params["max_tokens"]), room)
                todo.append((i, rec, ids, SamplingParams.from_dict(params)))
            except Exception as e:  # noqa: BLE001 - one bad record must not fail the run
                out[i] = json.dumps({**rec, "error": str(e)})
        if todo:
            results = self.engine.generate([t[2] for t in todo], [t[3] for t in todo], [self.key] * len(todo))
            for (i, rec, ids, _), res in zip(todo, results):
                out[i] = json.dumps({**rec, "output": res.text, "finish_reason": res.finish_reason,
                                     "model": self.model, "usage": {"prompt_tokens": len(ids),
                                                                    "completion_tokens": res.completion_tokens}})
        return {"text": np.array(out, dtype=object)}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


def generate_offline(model_ref: str | None, input_path: str | Path, output_path: str | Path,
                     registry: str = "adapters", base: str | None = None, num_workers: int = 2, *,
                     max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                     stop: list[str] | None = None, seed: int | None = None, batch_size: int = 16,
                     use_gpu: bool = False, threads_per_worker: int = 1, address: str | None = None,
                     num_cpus: int | None = None) -> dict[str, Any]:
    """Generate a completion for every line of `input_path` and write them to `output_path` (JSONL).

    Args:
        model_ref: an adapter (`name`, `name@vN`), or None / `base` for the base model.
        input_path / output_path: JSONL files (see the module docstring for the record format).
        registry: adapter registry; base: base model (default: the adapter's manifest, else the embedded one).
        num_workers: Ray Data actors, each with its own model copy (1 CPU or 1 GPU each).
        max_tokens, temperature, top_p, stop, seed: defaults for records that do not set them (greedy by default).
        batch_size: records per engine batch; address / num_cpus: Ray cluster (empty: a private local one).

    Returns:
        Summary: records, errors, completion_tokens, wall_s, tokens_per_s, model, output.
    """
    t0 = time.perf_counter()
    inp, outp = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise FileNotFoundError(f"input file not found: {inp}")
    adapter_ref, adapter_path, base = resolve_model(model_ref, registry, base)
    lines = [line for line in inp.read_text().splitlines() if line.strip()]
    defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop or [],
                "seed": seed}
    stats = {"records": 0, "errors": 0, "completion_tokens": 0}
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = outp.with_name(outp.name + ".partial")
    rows = map_lines(lines, BatchGenerator, {"base": base, "adapter_path": adapter_path, "adapter_ref": adapter_ref,
                                             "defaults": defaults}, num_workers=num_workers, batch_size=batch_size,
                     use_gpu=use_gpu, threads_per_worker=threads_per_worker, address=address, num_cpus=num_cpus)
    with tmp.open("w") as f:
        for rec in rows:
            stats["records"] += 1
            stats["errors"] += "error" in rec
            stats["completion_tokens"] += (rec.get("usage") or {}).get("completion_tokens", 0)
            f.write(json.dumps(rec) + "\n")
    tmp.replace(outp)
    wall = time.perf_counter() - t0
    return {**stats, "wall_s": round(wall, 2), "tokens_per_s": round(stats["completion_tokens"] / wall, 1),
            "model": adapter_ref or base, "base": base, "output": str(outp)}


def resolve_model(model_ref: str | None, registry: str, base: str | None) -> tuple[str | None, str | None, str]:
    """(adapter reference pinned to its version, its local folder, base model) for `--model` (None / `base`:
    the base model alone; the base defaults to the adapter's manifest, else the embedded model)."""
    from fineray.train.registry import AdapterRegistry

    adapter_ref = adapter_path = None
    if model_ref and model_ref != BASE_ALIAS:
        reg = AdapterRegistry(registry)
        version = reg.get(model_ref)  # pin the exact version for every worker
        adapter_ref, adapter_path = version.ref, str(reg.local_path(version.ref))
        base = base or version.manifest.get("base_model")
    return adapter_ref, adapter_path, base or EMBEDDED_MODEL


def map_lines(lines: list[str], cls: type, kwargs: dict[str, Any], *, num_workers: int = 2, batch_size: int = 16,
              use_gpu: bool = False, threads_per_worker: int = 1, address: str | None = None,
              num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Run JSON lines through a Ray Data callable class (`BatchGenerator` or a subclass) on `num_workers` actors;
    yields the output records in input order. `kwargs`: the class's constructor arguments besides threads,
    device and max_batch_size."""
    import ray

    from fineray.base.connect import init_ray, shutdown_ray

    # Workers hold their CPUs for the whole run; one more CPU keeps Ray Data's own tasks schedulable.
    started = init_ray(address, num_cpus or num_workers * (0 if use_gpu else threads_per_worker) + 1)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output lines in input order
        # Lines go in from the driver as blocks of ~batch_size records, so every worker gets batches
        # (a single file read by `read_text` is one block, and its read task competes with the actors).
        ds = ray.data.from_items([{"text": line} for line in lines],
                                 override_num_blocks=max(1, min(math.ceil(len(lines) / batch_size), 1000)))
        ds = ds.map_batches(cls, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_workers),
                            num_cpus=0 if use_gpu else threads_per_worker, num_gpus=1 if use_gpu else 0,
                            fn_constructor_kwargs={**kwargs, "threads": threads_per_worker,
                                                   "device": "cuda" if use_gpu else "cpu",
                                                   "max_batch_size": batch_size})
        for row in ds.iter_rows():
            yield json.loads(row["text"])
    finally:
        if started:
            shutdown_ray()
