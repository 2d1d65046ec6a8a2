"""Batching: per-worker shards, deterministic epoch order, dynamic padding.

The order of epoch `e` is a permutation seeded by (seed, e), so a resumed run skips exactly the micro-batches
it had consumed and sees the same data afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fineray.train.templates import IGNORE_INDEX, Tokenized

__all__ = ["collate", "shard_batches", "epoch_batches"]


def collate(items: list[Tokenized], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding); labels are -100 on padding."""
    longest = max(len(t) for t in items)
    if pad_to_multiple > 1:
        longest = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shard_batches(n_items: int, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                  shuffle: bool = True, group_by_length: list[int] | None = None) -> list[list[int]]:
    """Index batches of one epoch for one rank. Every rank gets the same number of batches (DDP needs it).

    Args:
        group_by_length: lengths of the items; when given, batches hold similar lengths (less padding) and
            the batch order is shuffled.
    """
    order = list(range(n_items))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length is not None:
        # Sort within mega-chunks of 64 batches, so batches are length-homogeneous yet the epoch stays random.
        mega = batch_size * world * 64
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: group_by_length[j])]
    per_step = batch_size * world
    n_batches = len(order) // per_step
    if n_batches == 0:
        raise ValueError(f"{n_items} training examples are fewer than one step needs "
                         f"(train.batch_size={batch_size} x {world} workers)")
    batches = [order[b * per_step:(b + 1) * per_step][rank::world] for b in range(n_batches)]
    if group_by_length is not None:
        rng.shuffle(batches)
    return batches


def epoch_batches(data: list[Tokenized], batch_size: int, rank: int, world: int, seed: int,
                  start_epoch: int = 0, start_batch: int = 0, group_by_length: bool = False
                  ) -> Iterator[tuple[int, int, list[Tokenized]]]:
    """Endless (epoch, batch_index, items) stream for one rank, starting at a saved position."""
    epoch, skip = start_epoch, start_batch
    lengths = [len(t) for t in data] if group_by_length else None
    while True:
        batches = shard_batches(len(data), batch_size, rank, world, seed, epoch, group_by_length=lengths)
        for b in range(skip, len(batches)):
            yield epoch, b, [data[i] for i in batches[b]]
        epoch, skip = epoch + 1, 0
