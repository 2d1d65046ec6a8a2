"""The GPU fast path of the training loop: packing, document-masked attention, chunked loss, compilation.

Each piece has a switch (`data.packing`, `train.fast.*`); `auto` turns it on when the loop runs on a CUDA
device and off on CPU, so CPU runs (and tests) keep the plain HF forward unless asked otherwise.

What each piece buys on realistic (variable-length) data:
  * packing: the padded batch of dynamic padding becomes one row of exactly the batch's tokens, so no
    compute is spent on padding, and attention cost is sum(len_i^2) with the varlen kernel;
  * chunked loss (`fused_loss.py`): no (tokens x vocab) logits tensors; for a 128k vocabulary that is the
    largest single activation;
  * regional `torch.compile` of every decoder layer: fused RMSNorm, SwiGLU, rotary and LoRA adds, fewer
    kernel launches. Attention stays outside the graph (cu_seqlens change every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fineray.train.batches import collate
from fineray.train.config import RunConfig
from fineray.train.fused_loss import LossHead
from fineray.train.packing import (
    PACKED_ATTENTION,
    pack_documents,
    packed_model_inputs,
    register_packed_attention,
    varlen_available,
)
from fineray.train.templates import IGNORE_INDEX, Tokenized

__all__ = ["FastPath", "apply_fast_path", "decoder_layers", "forward_loss", "make_batch", "model_inputs",
           "resolve_fast"]


@dataclass
class FastPath:
    """Resolved fast-path switches for one run on one device."""

    packing: bool = False
    attention: str | None = None  # varlen | flex | sdpa when packing
    chunked_loss: bool = False
    chunk_tokens: int | None = None
    compile: bool = False
    group_by_length: bool = False
    expandable_segments: bool = False
    pad_multiple: int = 1
    compile_attention: bool = False
    balance_ranks: bool = False
    head: LossHead | None = None

    def describe(self) -> str:
        """One line for the run log."""
        parts = [f"packing={'on/' + str(self.attention) if self.packing else 'off'}",
                 f"chunked_loss={'on' if self.chunked_loss else 'off'}",
                 f"compile={('on+attention' if self.compile_attention else 'on') if self.compile else 'off'}",
                 f"balance_ranks={'on' if self.balance_ranks else 'off'}",
                 f"expandable_segments={'on' if self.expandable_segments else 'off'}"]
        return "fast path: " + " ".join(parts)


def _auto(value: Any, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def resolve_fast(cfg: RunConfig, use_gpu: bool, dtype: torch.dtype | None = None) -> FastPath:
    """Turn the `auto` switches into on/off for this device (and weight dtype)."""
    f = cfg.train.fast
    # A reward model reads its score at each row's last token of a left-padded batch: never packed.
    packing = _auto(cfg.data.packing, use_gpu) and cfg.objective != "reward"
    attention = None
    if packing:
        attention = f.packing_attention
        if attention == "auto":
            half = dtype in (torch.bfloat16, torch.float16)
            attention = "varlen" if use_gpu and half and varlen_available() else "sdpa"
    # ZeRO-3 partitions the head weight; the chunked loss is verified under DDP and FSDP only.
    chunked = _auto(f.chunked_loss, use_gpu and cfg.train.strategy != "deepspeed")
    compile_ = _auto(f.compile, use_gpu)
    return FastPath(packing=packing, attention=attention, chunked_loss=chunked,
                    chunk_tokens=f.loss_chunk_tokens, compile=compile_, group_by_length=f.group_by_length,
                    expandable_segments=use_gpu and _auto(f.expandable_segments, True),
                    pad_multiple=8 if use_gpu else 1,
                    compile_attention=compile_ and _auto(f.compile_attention, True) and attention == "varlen",
                    balance_ranks=_auto(f.balance_ranks, packing))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the longest `*.layers` ModuleList), for compilation and FSDP wrapping."""
    best: list[torch.nn.Module] = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") \
                and len(mod) > len(best):
            best = list(mod)
    return best


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    m = getattr(model, "module", model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def apply_fast_path(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """Install the fast-path pieces on a loaded (PEFT-wrapped) model, before DDP/FSDP wrapping."""
    lm = _causal_lm(model)
    if fast.expandable_segments:
        try:  # applies to segments allocated from now on; the same switch vLLM flips at run time
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except (AttributeError, RuntimeError):
            fast.expandable_segments = False
    if fast.packing:
        register_packed_attention()
        lm.config._attn_implementation = PACKED_ATTENTION[
            "varlen_graph" if fast.compile_attention else fast.attention]
    if fast.chunked_loss:
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if isinstance(head, LossHead):  # already installed (the same model trained twice in one process)
            head.chunk_tokens = fast.chunk_tokens
            fast.head = head
        elif type(head) is torch.nn.Linear and head.bias is None and not softcap:
            fast.head = LossHead(head, fast.chunk_tokens)
            lm.set_output_embeddings(fast.head)
        else:  # a LoRA-wrapped or biased head, or logit soft-capping: keep the plain loss
            fast.chunked_loss = False
    if fast.compile:
        import torch._dynamo as dynamo

        # One compiled graph serves all blocks, but guards can still differ per block: allow enough entries,
        # and fall back to eager (instead of failing the run) if a block cannot be compiled.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 2048)
        dynamo.config.suppress_errors = True
        for layer in decoder_layers(lm):
            layer.compile(dynamic=True)
    return model


def make_batch(items: list[Tokenized], pad_id: int, fast: FastPath) -> dict[str, Any]:
    """A packed row (packing on) or a dynamically padded batch, with its target and token counts as host
    ints (`n_target`, `n_tokens`): counting them here, before the copy to the GPU, saves two device syncs
    per micro-step."""
    batch = pack_documents(items, pad_id, fast.pad_multiple) if fast.packing else \
        collate(items, pad_id, fast.pad_multiple)
    batch["n_target"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    batch["n_tokens"] = int(batch["attention_mask"].sum())
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch (ints such as `max_seqlen` stay on the host)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any], fast: FastPath) -> dict[str, Any]:
    """The model's forward kwargs for a batch from `make_batch` (packed: positions and document bounds)."""
    if fast.packing:
        return packed_model_inputs(batch, fast.attention)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def forward_loss(model: torch.nn.Module, batch: dict[str, Any], fast: FastPath) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's target tokens and their count (same value as the plain HF loss), for a
    batch from `make_batch`."""
    labels = batch["labels"]
    n_target = batch["n_target"]  # counted on the host by make_batch
    inputs = model_inputs(batch, fast)
    if fast.head is None:
        return model(**inputs, labels=labels).loss, n_target
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # next-token targets, aligned with the hidden states
    fast.head.set_targets(targets)
    try:
        loss = model(**inputs).logits  # the head returned the mean loss
    finally:
        fast.head.set_targets(None)
    return loss, n_target
