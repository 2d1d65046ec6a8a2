"""Sequence packing without cross-contamination.

A micro-batch's examples are concatenated into one row (no padding tokens in between). Each document keeps
its own positions (0, 1, ... per document, so rotary embeddings see the same positions as unpacked) and its
own attention: a token attends only to earlier tokens of the same document. The first label of every
document is dropped, so the last token of one document is never trained to predict the next document.
With these three rules the packed loss and gradients equal the unpacked ones (tested on CPU).

Document-masked attention backends, registered with transformers' `AttentionInterface`:
  * `varlen`: `torch.nn.attention.varlen.varlen_attn` (flash attention over cu_seqlens; CUDA, bf16/fp16).
    Cost is sum(len_i^2) instead of T^2, and no mask is materialised.
  * `flex`: FlexAttention with a document block mask (compiled kernel; CUDA or CPU).
  * `sdpa`: SDPA with a dense (T x T) block-diagonal causal mask. Works anywhere; O(T^2) memory for the
    mask, so it is the CPU/test path.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fineray.train.templates import IGNORE_INDEX, Tokenized

__all__ = [
    "PACKED_ATTENTION",
    "document_mask",
    "pack_documents",
    "packed_model_inputs",
    "register_packed_attention",
    "varlen_available",
]

PACKED_ATTENTION = {"varlen": "fineray_varlen", "varlen_graph": "fineray_varlen_graph",
                    "flex": "fineray_flex", "sdpa": "fineray_sdpa"}


def pack_documents(items: list[Tokenized], pad_id: int, pad_to_multiple: int = 1) -> dict[str, Any]:
    """Concatenate `items` into one row.

    Returns a batch with `input_ids`, `labels`, `attention_mask` (1 on real tokens, for token counting
    only: it is not passed to the model), `position_ids` (reset per document), `cu_seqlens` (int32
    document boundaries, the padding tail being one extra segment) and `max_seqlen` (a Python int).
    """
    lengths = [len(t) for t in items]
    total = sum(lengths)
    width = -(-total // pad_to_multiple) * pad_to_multiple if pad_to_multiple > 1 else total
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((1, width), dtype=torch.long)
    mask = torch.zeros((1, width), dtype=torch.long)
    bounds, start = [0], 0
    for t, n in zip(items, lengths):
        ids[0, start:start + n] = torch.tensor(t.input_ids)
        labels[0, start:start + n] = torch.tensor(t.labels)
        labels[0, start] = IGNORE_INDEX  # never predict a document's first token from the previous document
        pos[0, start:start + n] = torch.arange(n)
        mask[0, start:start + n] = 1
        start += n
        bounds.append(start)
    if width > total:  # the padding tail is its own segment: it attends to itself only, and has no labels
        pos[0, total:] = torch.arange(width - total)
        bounds.append(width)
    seg = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos,
            "cu_seqlens": seg, "max_seqlen": int((seg[1:] - seg[:-1]).max())}


def document_ids(cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Segment index of every position of a packed row (length `width`)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[:width]


def document_mask(cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Dense boolean (1, 1, T, T) mask: causal and within one document (True = may attend)."""
    doc = document_ids(cu_seqlens, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc[:, None] == doc[None, :]))[None, None]


def varlen_available() -> bool:
    """Whether PyTorch ships the flash varlen attention (`torch.nn.attention.varlen`, PyTorch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _varlen_call() -> Any:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # PyTorch 2.10 spells causality `is_causal=True`, later versions `window_size=(-1, 0)`.
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def _unpacked(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Any, scaling: float | None, dropout: float, kwargs: dict[str, Any]) -> Any:
    # A plain (right-padded) batch through a packed-attention model, e.g. evaluation: transformers built no
    # mask for our custom backend, and causal attention alone is exact for right padding.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _varlen_attention_graph(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if "cu_seq_lens_q" not in kwargs:
        return _unpacked(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    fn, causal, has_gqa = _varlen_call()
    b, h, t, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, hk, d)
    v = value.transpose(1, 2).reshape(b * t, hk, d)
    extra: dict[str, Any] = {}
    if h != hk:
        if has_gqa:
            extra["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, h // hk), _repeat_kv(v, h // hk)
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    dtype = q.dtype
    if dtype not in (torch.bfloat16, torch.float16):  # flash kernels are half-precision only (QLoRA's fp32
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)  # norms give fp32 q/k/v)
    out = fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal, **extra)
    return out.to(dtype).view(b, t, h, d), None


# Default: a graph break around attention (cu_seqlens/max_seqlen change every step, the layer graph does not).
# `train.fast.compile_attention` registers the plain function instead: varlen_attn is a custom op with a fake
# kernel, so the compiled layer can hold it, with the lengths symbolic.
_varlen_attention = torch.compiler.disable(_varlen_attention_graph)


def _sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    if "cu_seq_lens_q" not in kwargs:
        return _unpacked(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    h, hk, t = query.shape[1], key.shape[1], query.shape[2]
    mask = kwargs.get("fineray_doc_mask")
    if mask is None:
        mask = document_mask(kwargs["cu_seq_lens_q"], t)
    k = key.repeat_interleave(h // hk, dim=1) if h != hk else key
    v = value.repeat_interleave(h // hk, dim=1) if h != hk else value
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _flex_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    if "cu_seq_lens_q" not in kwargs:
        return _unpacked(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    h, hk = query.shape[1], key.shape[1]
    out = _compiled_flex()(query, key, value, block_mask=kwargs["fineray_block_mask"], scale=scaling,
                           enable_gqa=h != hk)
    return out.transpose(1, 2).contiguous(), None


_FLEX: Any = None


def _compiled_flex() -> Any:
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX


def _flex_block_mask(cu_seqlens: torch.Tensor, width: int) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens, width)

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (q >= kv) & (doc[q] == doc[kv])

    return create_block_mask(mask_mod, 1, None, width, width, device=doc.device)


def register_packed_attention() -> None:
    """Register the three document-masked attention functions with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION["varlen"], _varlen_attention)
    AttentionInterface.register(PACKED_ATTENTION["varlen_graph"], _varlen_attention_graph)
    AttentionInterface.register(PACKED_ATTENTION["sdpa"], _sdpa_attention)
    AttentionInterface.register(PACKED_ATTENTION["flex"], _flex_attention)


def packed_model_inputs(batch: dict[str, Any], backend: str) -> dict[str, Any]:
    """Keyword arguments for the model's forward on a packed batch (no 2-D attention mask: positions and
    cu_seqlens carry the document structure; transformers forwards the extra kwargs to the attention)."""
    cu = batch["cu_seqlens"]
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                          "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                          "max_length_q": batch["max_seqlen"], "max_length_k": batch["max_seqlen"]}
    width = batch["input_ids"].shape[1]
    if backend == "sdpa":
        kw["fineray_doc_mask"] = document_mask(cu, width)  # built once per step, shared by every layer
    elif backend == "flex":
        kw["fineray_block_mask"] = _flex_block_mask(cu, width)
    return kw
