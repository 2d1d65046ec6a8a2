"""Log-probabilities of target tokens, per token and summed per document (preference and RL objectives).

On the fast path (the chunked `LossHead` installed) the per-token log-probs come from the head in chunks,
without the (tokens x vocabulary) logits; otherwise from the model's logits with an fp32 log-softmax.
Documents are the rows of a padded batch, or the segments of a packed row (`cu_seqlens`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from fineray.train.checkpoint import unwrap
from fineray.train.fastpath import FastPath, model_inputs
from fineray.train.packing import document_ids
from fineray.train.templates import IGNORE_INDEX

__all__ = ["adapter_disabled", "document_sums", "shifted_targets", "token_logps"]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the positions that predict them (-100 where nothing is predicted)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def token_logps(model: torch.nn.Module, batch: dict[str, Any], fast: FastPath) -> torch.Tensor:
    """log p(target) at every position, (rows, tokens) in fp32, 0 where there is no target."""
    targets = shifted_targets(batch["labels"])
    inputs = model_inputs(batch, fast)
    if fast.head is not None:
        fast.head.set_targets(targets, per_token=True)
        try:
            return model(**inputs).logits.float()  # the head returned the per-token log-probs
        finally:
            fast.head.set_targets(None)
    logits = model(**inputs).logits
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    # gather - logsumexp instead of log_softmax: one (tokens x vocab) fp32 tensor fewer
    lp = logits.gather(-1, safe[..., None]).squeeze(-1).float() - torch.logsumexp(logits.float(), dim=-1)
    return lp * mask


def document_sums(values: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document sums of per-position `values` over target positions, and the target counts.

    Padded batches: one document per row. Packed rows: the `n_docs` segments of `cu_seqlens` (the padding
    tail, if any, is dropped). A target never crosses documents: packing drops each document's first label.
    """
    mask = shifted_targets(batch["labels"]) != IGNORE_INDEX
    if "cu_seqlens" not in batch:
        return (values * mask).sum(-1), mask.sum(-1)
    n_docs = batch["n_docs"]
    width = values.shape[1]
    doc = document_ids(batch["cu_seqlens"].to(values.device), width)
    sums = torch.zeros(len(batch["cu_seqlens"]) - 1, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, doc, (values * mask)[0])
    counts.index_add_(0, doc, mask[0].to(values.dtype))
    return sums[:n_docs], counts[:n_docs]


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The same weights without the adapter (PEFT), yielded unwrapped from DDP/DeepSpeed: the reference
    policy of LoRA-family runs, with no second model copy. Use under `torch.no_grad()`."""
    inner = unwrap(model)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("the reference with the adapter disabled needs an adapter method (lora, dora, qlora)")
    with inner.disable_adapter():
        yield inner
