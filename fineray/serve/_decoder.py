"""A Llama-family decoder forward over a static KV cache in fixed slots (the fast path's model runner).

The cache is one tensor per layer for keys and one for values, `(slots + 1, kv_heads, capacity, head_dim)`:
a sequence owns one slot for its whole life and its token at position p lives at column p, so nothing is
concatenated, padded or trimmed while it runs. The extra last slot is scratch: padding rows of a batch
write there, so they never touch a live sequence's slot. Writes go through one `index_copy_` per layer
(flat indices computed once per forward), reads of a decode step are plain views of the first `batch`
slots (the engine keeps decoding rows in slots 0..n-1), which is what lets a decode step be captured as a
CUDA graph: every shape is fixed by (batch bucket, context bucket) and every input lives in a buffer.

The forward re-uses the Hugging Face model's own modules (embeddings, norms, projections, MLPs, rotary
tables, `apply_rotary_pos_emb` of the model's module), so it covers the architectures that share Llama's
layer layout: Llama, Mistral (full attention), Qwen2 and Qwen3 (with q/k norms). `supports(model)` says
whether a model qualifies; anything else is served by the dynamic-cache path. LoRA hooks on the linear
layers (fineray.serve.lora_stack) apply unchanged, since the projections are called as modules.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["StaticDecoder", "supports"]

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
# rope types whose tables depend only on the position (dynamic NTK / longrope rescale with the length seen)
_STATIC_ROPE = {None, "default", "linear", "llama3", "yarn"}


def _rope_type(cfg: Any) -> str | None:
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, attr, None)
        if isinstance(params, dict):
            return params.get("rope_type") or params.get("type")
    return None


def supports(model: Any) -> str | None:
    """None when `model` can run on the static decoder, else the reason it cannot."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind not in _FAMILIES:
        return f"model type {kind!r} is not one of {sorted(_FAMILIES)}"
    if _rope_type(cfg) not in _STATIC_ROPE:
        return f"rope type {_rope_type(cfg)!r} rescales with the sequence length"
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (window and getattr(cfg, "use_sliding_window", True)
                                                           and kind == "mistral"):
        return "sliding-window attention layers"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "not a decoder with `model.layers` and `model.rotary_emb`"
    return None


class StaticDecoder:
    """Runs a supported HF causal LM over a slot KV cache.

    Args:
        model: the HF model (eval mode, on its device).
        slots: sequences held at once (the cache gets one more, scratch slot).
        capacity: tokens per slot; `grow` raises it (and invalidates anything holding cache views).
    """

    def __init__(self, model: Any, slots: int, capacity: int):
        self.model = model
        self.inner = model.model
        cfg = model.config
        attn = self.inner.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self._rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.slots, self.scratch = slots, slots
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cos = self.sin = torch.empty(0)
        self.grow(capacity)

    # ------------------------------------------------------------------ cache
    def grow(self, capacity: int) -> bool:
        """Make every slot hold at least `capacity` tokens (copying what is cached); True if it grew."""
        capacity = min(capacity, self.max_context)
        if capacity <= self.capacity:
            return False
        shape = (self.slots + 1, self.kv_heads, capacity, self.head_dim)
        keys, values = [], []
        for i in range(len(self.inner.layers)):
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if self.keys:
                k[:, :, : self.capacity] = self.keys[i]
                v[:, :, : self.capacity] = self.values[i]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.keys_flat = [k.view(-1, self.head_dim) for k in keys]
        self.values_flat = [v.view(-1, self.head_dim) for v in values]
        pos = torch.arange(capacity, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = self.inner.rotary_emb(probe, pos)  # (1, capacity, rotary dim), the model's own rope
        self.cos, self.sin = cos[0], sin[0]
        self.capacity = capacity
        return True

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` cached tokens into slot `dst` (every layer)."""
        if src == dst or length <= 0:
            return
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` cached tokens of slots `a` and `b`."""
        if a == b or length <= 0:
            return
        for k, v in zip(self.keys, self.values):
            for t in (k, v):
                tmp = t[a, :, :length].clone()
                t[a, :, :length] = t[b, :, :length]
                t[b, :, :length] = tmp

    def write_index(self, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat cache rows for tokens at `pos (B, T)` in slots `slot` (`(B, T)` or `(B, 1)`), ordered
        (b, kv_head, t) like the keys of a forward pass."""
        heads = torch.arange(self.kv_heads, device=pos.device).view(1, -1, 1)
        return ((slot.unsqueeze(1) * self.kv_heads + heads) * self.capacity + pos.unsqueeze(1)).reshape(-1)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor, mask: torch.Tensor,
                read_slots: torch.Tensor | None, length: int) -> torch.Tensor:
        """Hidden states after the final norm, `(B, T, hidden)`.

        Args:
            ids, pos: token ids and their positions, `(B, T)`.
            write: flat cache rows for every (b, kv_head, t) (see `write_index`); padding goes to scratch.
            mask: `(B, 1, 1, T, length)` bool, True where query t of row b may attend to cached column j.
            read_slots: the slot of each row, or None when row b is in slot b (decode: no gather copy).
            length: cached columns attended to (the context bucket).
        """
        b, t = ids.shape
        x = self.inner.embed_tokens(ids)
        cos, sin = self.cos[pos], self.sin[pos]  # (B, T, rotary dim)
        group = self.heads // self.kv_heads
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.heads, self.head_dim)
            k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim)
            v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            self.keys_flat[i].index_copy_(0, write, k.reshape(-1, self.head_dim))
            self.values_flat[i].index_copy_(0, write, v.transpose(1, 2).reshape(-1, self.head_dim))
            if read_slots is None:
                keys, values = self.keys[i][:b, :, :length], self.values[i][:b, :, :length]
            else:
                keys = self.keys[i][:, :, :length].index_select(0, read_slots)
                values = self.values[i][:, :, :length].index_select(0, read_slots)
            # grouped-query attention without repeating K/V: (B, kv, group*T, D) x (B, kv, D, L)
            qg = q.reshape(b, self.kv_heads, group * t, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling
            scores = scores.view(b, self.kv_heads, group, t, length).masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(values.dtype).view(b, self.kv_heads, group * t, length)
            out = torch.matmul(probs, values).view(b, self.heads, t, self.head_dim).transpose(1, 2)
            x = x + attn.o_proj(out.reshape(b, t, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.inner.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(N, hidden)` -> float logits `(N, vocab)`."""
        return self.model.lm_head(hidden).float()
