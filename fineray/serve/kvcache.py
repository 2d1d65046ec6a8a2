"""Row-level surgery on a transformers `DynamicCache` for iteration-level batching.

Rows are left-padded: each row's tokens fill the right end of the cache, and a 2-D attention mask marks the
real columns. Joining two batches pads the narrower one on the left and concatenates along the batch
dimension; dropping rows selects along it; columns that are padding for every remaining row are trimmed, so
the cache never grows past the longest live sequence. Every row keeps its own position ids (computed by
the engine), so padding never shifts positions. Only caches made of plain `DynamicLayer`s (full attention,
keys/values `(batch, heads, tokens, dim)`) can be edited like this; `is_plain` tells.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_plain", "join", "select_rows", "trim"]


def is_plain(cache: Any) -> bool:
    """Whether every layer is a plain dynamic KV layer (not sliding-window, linear-attention, quantised)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


def _pad_left(x: torch.Tensor, width: int, dim_from_end: int) -> torch.Tensor:
    extra = width - x.shape[-dim_from_end]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, 0) * (dim_from_end - 1) + (extra, 0))


def join(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place); returns the joined attention mask."""
    width = max(mask.shape[1], other_mask.shape[1])
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
        mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
    return torch.cat([_pad_left(mask, width, 1), _pad_left(other_mask, width, 1)])


def select_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` of `cache` (in place); returns their mask."""
    cache.batch_select_indices(torch.tensor(keep, device=mask.device))
    return mask[keep]


def trim(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding for every row (in place); returns the trimmed mask."""
    first = int(mask.any(0).long().argmax())
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]
    return mask[:, first:]
