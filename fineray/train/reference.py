"""Reference log-probs precomputed once, before training (DPO/IPO with `method: full`, when continuing a
supervised `model.adapter`, or with `dpo.reference: precomputed`).

The reference is the starting policy: the base model (plus `model.adapter` when given). Its log-probs of
every pair's chosen and rejected response are computed in one Ray Data pass (actors holding the frozen
model, `scaling.num_workers` of them) and handed to the training workers keyed by pair content, so a full
fine-tune never holds a second model copy. Outside Ray Train (a local session) the worker computes them
itself before training, with the same function.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fineray.train.config import RunConfig
from fineray.train.fastpath import FastPath
from fineray.train.logprobs import document_sums, token_logps
from fineray.train.pairs import Pair, pair_batch

__all__ = ["needs_precomputed_reference", "pair_reference_logps", "precompute_reference"]


def needs_precomputed_reference(cfg: RunConfig) -> bool:
    """Whether the objective needs reference log-probs computed before training."""
    if cfg.objective not in ("dpo", "ipo") or cfg.dpo.reference == "adapter_disabled":
        return False
    return cfg.method == "full" or cfg.dpo.reference == "precomputed" or bool(cfg.model.adapter)


@torch.no_grad()
def pair_reference_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int, batch_size: int = 8,
                         device: torch.device | str = "cpu") -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of `model` for every pair (eval mode, plain padded batches)."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = pair_batch(chunk, pad_id, FastPath())
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sums, _ = document_sums(token_logps(model, batch, FastPath()), batch)
            n = len(chunk)
            out.extend(zip(sums[:n].tolist(), sums[n:].tolist()))
    finally:
        model.train(was_training)
    return out


class _ReferenceScorer:
    """Ray Data callable class: the frozen starting policy; pairs in, reference log-probs out."""

    def __init__(self, run: dict[str, Any], adapter_path: str | None, threads: int) -> None:
        from fineray.train.config import RunConfig
        from fineray.train.model import load_base_model, load_tokenizer, resolve_base

        torch.set_num_threads(threads)
        cfg = RunConfig.model_validate(run)
        self.use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.use_gpu else "cpu")
        path = resolve_base(cfg.model.base)
        self.pad_id = load_tokenizer(cfg.model, path).pad_token_id
        model = load_base_model(cfg.model, method=cfg.method, use_gpu=self.use_gpu, path=path)
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
        self.model = model.to(self.device).eval()
        self.batch_size = max(8, cfg.train.batch_size)  # inference only: bigger batches than training

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fineray.train.templates import Tokenized

        pairs = [Pair(Tokenized(list(ci), list(cl)), Tokenized(list(ri), list(rl)), key)
                 for key, ci, cl, ri, rl in zip(batch["key"], batch["chosen_ids"], batch["chosen_labels"],
                                                batch["rejected_ids"], batch["rejected_labels"])]
        refs = pair_reference_logps(self.model, pairs, self.pad_id, self.batch_size, self.device)
        return {"key": batch["key"], "ref_chosen": np.array([r[0] for r in refs]),
                "ref_rejected": np.array([r[1] for r in refs])}


def precompute_reference(cfg: RunConfig, adapter_path: str | None = None) -> dict[str, tuple[float, float]]:
    """Reference log-probs of every training and validation pair, keyed by `Pair.key` (a Ray Data pass on
    the running Ray cluster; one actor per training worker)."""
    import ray

    from fineray.train.model import load_tokenizer, resolve_base
    from fineray.train.preference import build_pair_data

    tok = load_tokenizer(cfg.model, resolve_base(cfg.model.base))
    train, val = build_pair_data(cfg, tok)
    pairs = {p.key: p for p in train + val}
    rows = [{"key": p.key, "chosen_ids": p.chosen.input_ids, "chosen_labels": p.chosen.labels,
             "rejected_ids": p.rejected.input_ids, "rejected_labels": p.rejected.labels} for p in pairs.values()]
    sc = cfg.scaling
    threads = int((sc.resources_per_worker or {}).get("CPU", 1))
    per_block = max(8, cfg.train.batch_size) * 4
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(math.ceil(len(rows) / per_block), 1000)))
    ds = ds.map_batches(_ReferenceScorer, batch_size=per_block,
                        compute=ray.data.ActorPoolStrategy(size=sc.num_workers),
                        num_cpus=0 if sc.use_gpu else threads, num_gpus=1 if sc.use_gpu else 0,
                        fn_constructor_kwargs={"run": cfg.to_dict(), "adapter_path": adapter_path,
                                               "threads": threads})
    return {r["key"]: (float(r["ref_chosen"]), float(r["ref_rejected"])) for r in ds.iter_rows()}
