"""Rollouts: completions of the current policy, from engine actors or from the policy itself.

Engine backend: `RolloutWorker` Ray actors each hold fineray's serving engine (`fineray.serve.engine`: one
base model, LoRA adapters by name, continuous batching). Each step every training worker sends its prompts
with the current adapter's files (megabytes, through the object store); the actor loads that adapter under
the step's name, drops the previous one and generates. The base weights never move.

Policy backend: each training worker samples from its own model with HF `generate` (any method, full
fine-tuning included).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fineray.train.checkpoint import save_weights, unwrap

__all__ = ["Rollout", "RolloutWorker", "adapter_files", "engine_generate", "policy_generate"]


@dataclass
class Rollout:
    """One completion: its token ids (the end-of-sequence token included when it stopped), text, finish reason."""

    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length


def adapter_files(model: torch.nn.Module) -> dict[str, bytes]:
    """The PEFT adapter of a (wrapped) model as {file name: bytes}."""
    with tempfile.TemporaryDirectory(prefix="fineray-rollout-") as tmp:
        folder = save_weights(unwrap(model), Path(tmp))
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class RolloutWorker:
    """Ray actor body: an engine that generates with the adapter it was last sent.

    Args:
        base: base model spec. device / dtype / max_batch_size / threads: as for `Engine`.
    """

    def __init__(self, base: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 64,
                 threads: int | None = None) -> None:
        from fineray.serve.engine import Engine

        self.engine = Engine(base, device=device, dtype=dtype, max_batch_size=max_batch_size, threads=threads)
        self.root = Path(tempfile.mkdtemp(prefix="fineray-rollout-"))
        self.lock = threading.Lock()
        self.current: str | None = None

    def _use(self, key: str, files: dict[str, bytes]) -> None:
        with self.lock:  # several training workers send the same step's adapter at once
            if key == self.current:
                return
            folder = self.root / key
            folder.mkdir(parents=True, exist_ok=True)
            for name, blob in files.items():
                (folder / name).write_bytes(blob)
            self.engine.load_adapter(key, folder)
            old, self.current = self.current, key
            if old is not None:
                self.engine.unload_adapter(old)  # freed once no row uses it
                shutil.rmtree(self.root / old, ignore_errors=True)

    def generate(self, key: str | None, files: dict[str, bytes] | None, prompts: list[list[int]],
                 params: list[dict[str, Any]]) -> list[Rollout]:
        """Completions of `prompts` (token ids) with the adapter `key` (its `files` when new; None: the base)."""
        from fineray.serve.engine import BASE
        from fineray.serve.sampling import SamplingParams

        if key is not None and files is not None:
            self._use(key, files)
        adapter = key if key is not None else BASE
        outs = self.engine.generate(prompts, [SamplingParams(**p) for p in params], [adapter] * len(prompts))
        return [Rollout(list(o.token_ids), o.text, o.finish_reason) for o in outs]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()
        shutil.rmtree(self.root, ignore_errors=True)


def engine_generate(actor: Any, key: str, files: Any, prompts: list[list[int]], max_new_tokens: int,
                    temperature: float, top_p: float, seeds: list[int]) -> list[Rollout]:
    """Rollouts from a `RolloutWorker` actor (`files`: the adapter's files or an object ref to them)."""
    import ray

    params = [{"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": s}
              for s in seeds]
    return ray.get(actor.generate.remote(key, files, prompts, params))


@torch.no_grad()
def policy_generate(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    temperature: float, top_p: float, seed: int, batch_size: int = 32) -> list[Rollout]:
    """Rollouts sampled by the policy itself (HF `generate`, left-padded batches; temperature 0: greedy)."""
    from fineray.train.pairs import collate_left
    from fineray.train.templates import Tokenized

    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = next(m.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(getattr(m, "generation_config", None), "eos_token_id", None)))
    eos.discard(None)
    out: list[Rollout] = []
    torch.manual_seed(seed)
    sample = temperature > 0
    kw: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
                          "eos_token_id": sorted(eos), "use_cache": True}
    if sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    try:
        for i in range(0, len(prompts), batch_size):
            batch = collate_left([Tokenized(p, p) for p in prompts[i:i + batch_size]], pad)
            ids = batch["input_ids"].to(device)
            gen = m.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device), **kw)
            for row in gen[:, ids.shape[1]:].tolist():
                stop = next((j for j, t in enumerate(row) if t in eos), None)
                toks = row if stop is None else row[:stop + 1]
                text = tokenizer.decode(toks if stop is None else toks[:-1], skip_special_tokens=True)
                out.append(Rollout(toks, text, "length" if stop is None else "stop"))
    finally:
        m.train(was_training)
    return out


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]
