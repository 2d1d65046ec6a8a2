"""Chunked linear + cross-entropy that never materialises the full logits.

A Llama-3 vocabulary has 128,256 entries: the plain loss keeps bf16 logits, their fp32 upcast and the fp32
gradient, about 10 bytes x tokens x vocab (10.5 GB for 8,192 tokens). Here the tokens are processed in
chunks; each chunk's logits are computed, turned into the loss and into the gradients with respect to the
hidden states (and the output weight, when it trains) in the forward pass, and freed. Memory is one chunk's
logits; compute is the same two matmuls per chunk as the plain path plus the weight-gradient matmul when the
head trains (the same as the plain backward), so speed is unchanged or better (fewer fp32 passes).

`LossHead` replaces a causal LM's `lm_head`: with no targets set it behaves exactly like the original
linear layer (evaluation, generation); with targets set (`fastpath.forward_loss`) its forward returns the
mean loss. Computing the loss *inside* the head's forward keeps DDP, FSDP2 and ZeRO-3 hooks (which act on
module forwards) in charge of the weight.
"""

from __future__ import annotations

from typing import Any

import torch

from fineray.train.templates import IGNORE_INDEX

__all__ = ["LossHead", "chunked_cross_entropy", "chunked_token_logps", "default_chunk_tokens"]


def default_chunk_tokens(vocab: int, budget_bytes: int = 1 << 30) -> int:
    """Tokens per chunk so one chunk's fp32 logits take about `budget_bytes` (a power of two, >= 256)."""
    n = max(256, budget_bytes // (4 * vocab))
    return 1 << (n.bit_length() - 1)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        valid = targets != IGNORE_INDEX
        n_valid = int(valid.sum())
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                              device=weight.device) if need_w else None)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax math (fp64 in exactness tests)
        scale = 1.0 / max(n_valid, 1)
        # Only rows with a target matter: the rest are dropped before the (tokens x vocab) matmul.
        for s, idx, h, t in _target_chunks(hidden, targets, chunk):
            logits = (h @ weight.t()).to(acc)  # bf16 matmul with fp32 accumulation, like nn.Linear
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d loss / d logits = softmax - onehot, scaled by 1/n_valid (mean over target tokens).
                probs = torch.exp_(logits.sub_(lse[:, None]))
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                g = probs.mul_(scale).to(hidden.dtype)
                if need_h:
                    grad_h.index_copy_(0, idx + s, (g @ weight).to(grad_h.dtype))
                if need_w:
                    grad_w.add_((g.t() @ h).to(grad_w.dtype))
            del logits
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-100 ignored), computed in chunks.

    Args:
        hidden: (..., d) final hidden states.
        weight: (vocab, d) output projection.
        targets: (...) next-token ids aligned with `hidden` (already shifted).
        chunk_tokens: tokens per chunk (default `default_chunk_tokens(vocab)`).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _ChunkedCE.apply(h, weight, t, chunk)


class _ChunkedLogp(torch.autograd.Function):
    """Per-token log-probabilities of the targets (0 where ignored), chunked like `_ChunkedCE`.

    The upstream gradient of each token's log-prob is only known in backward (a preference loss weighs tokens
    by a sigmoid of the whole pair's margin), but d logp_t / d h_t = W[t] - softmax_t @ W depends on token t
    alone, so the forward stores it (one hidden-sized row per token) and the backward only scales it: two
    matmuls per chunk, as in the plain path. The weight gradient (a trainable head) is recomputed in backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        unit = torch.zeros_like(hidden) if need_h else None
        for s, idx, h, t in _target_chunks(hidden, targets, chunk):
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            out.index_copy_(0, idx + s, logits.gather(1, t[:, None]).squeeze(1) - lse)
            if need_h:
                probs = torch.exp_(logits.sub_(lse[:, None]))
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # softmax - onehot = -d logp / d logits
                unit.index_copy_(0, idx + s, (-(probs.to(hidden.dtype) @ weight)).to(unit.dtype))
            del logits
        ctx.chunk, ctx.weight_dtype = chunk, weight.dtype
        ctx.save_for_backward(unit, hidden if need_w else None, weight if need_w else None, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        unit, hidden, weight, targets = ctx.saved_tensors
        gh = unit * grad_out[:, None].to(unit.dtype) if unit is not None else None
        gw = None
        if weight is not None:
            acc = torch.promote_types(hidden.dtype, torch.float32)
            gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device)
            for s, idx, h, t in _target_chunks(hidden, targets, ctx.chunk):
                logits = (h @ weight.t()).to(acc)
                probs = torch.softmax(logits, dim=-1)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                g = probs.mul_(-grad_out.index_select(0, idx + s)[:, None].to(acc)).to(hidden.dtype)
                gw.add_((g.t() @ h).to(gw.dtype))
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, None, None


def _target_chunks(hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> Any:
    """(offset, row indices, hidden rows, targets) of each chunk's rows that have a target."""
    for s in range(0, hidden.shape[0], chunk):
        t = targets[s:s + chunk]
        ok = t != IGNORE_INDEX
        if not bool(ok.any()):
            continue
        idx = ok.nonzero().squeeze(1)
        yield s, idx, hidden[s:s + chunk].index_select(0, idx), t.index_select(0, idx)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(target) of every position of `hidden @ weight.T` (0 where the target is -100), shaped like
    `targets`, without materialising the full logits."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _ChunkedLogp.apply(h, weight, t, chunk).view(targets.shape)


class LossHead(torch.nn.Module):
    """Drop-in for a bias-free `lm_head` that can return the chunked loss instead of the logits."""

    def __init__(self, head: torch.nn.Linear, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied, state-dict keys unchanged
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk_tokens = chunk_tokens
        self._targets: torch.Tensor | None = None
        self._per_token = False

    def set_targets(self, targets: torch.Tensor | None, per_token: bool = False) -> None:
        """Targets (shifted next-token ids) for the next forward; None restores plain logits. `per_token`:
        the forward returns each position's target log-prob (`chunked_token_logps`) instead of the mean loss."""
        self._targets, self._per_token = targets, per_token

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return torch.nn.functional.linear(hidden, self.weight)
        targets, self._targets = self._targets, None
        if self._per_token:
            return chunked_token_logps(hidden, self.weight, targets, self.chunk_tokens)
        return chunked_cross_entropy(hidden, self.weight, targets, self.chunk_tokens)
