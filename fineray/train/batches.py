"""Batching: per-worker shards, deterministic epoch order, dynamic padding.

The order of epoch `e` is a permutation seeded by (seed, e), so a resumed run skips exactly the micro-batches
it had consumed and sees the same data afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fineray.train.templates import IGNORE_INDEX, Tokenized

__all__ = ["balance", "collate", "epoch_batches", "shard_batches", "split_by_tokens"]


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


def balance(step_items: list[int], lengths: list[int], world: int) -> list[list[int]]:
    """Deal one step's items to `world` ranks, the same count each, by tokens: longest first, each to the
    rank with the fewest tokens so far that still has room (LPT scheduling with a count cap). Deterministic,
    so every rank computes the same split."""
    per_rank = len(step_items) // world
    ranks: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(step_items, key=lambda j: (-lengths[j], j)):
        r = min((r for r in range(world) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(i)
        load[r] += lengths[i]
    return ranks


def split_by_tokens(items: list[Tokenized], max_tokens: int | None) -> list[list[Tokenized]]:
    """Consecutive chunks of whole items with at most `max_tokens` tokens each (an item longer than that is a
    chunk of its own). `None`: one chunk."""
    if not max_tokens:
        return [items]
    chunks: list[list[Tokenized]] = [[]]
    used = 0
    for t in items:
        if chunks[-1] and used + len(t) > max_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(t)
        used += len(t)
    return chunks


def shard_batches(n_items: int, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                  shuffle: bool = True, group_by_length: list[int] | None = None,
                  balance_lengths: list[int] | None = None) -> list[list[int]]:
    """Index batches of one epoch for one rank. Every rank gets the same number of batches (DDP needs it).

    Args:
        group_by_length: lengths of the items; when given, batches hold similar lengths (less padding) and
            the batch order is shuffled.
        balance_lengths: lengths of the items; when given (and world > 1), each step's items are dealt to
            the ranks by tokens (`balance`) instead of round-robin. The step's set of items is unchanged.
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
    if balance_lengths is not None and world > 1:
        batches = [balance(order[b * per_step:(b + 1) * per_step], balance_lengths, world)[rank]
                   for b in range(n_batches)]
    else:
        batches = [order[b * per_step:(b + 1) * per_step][rank::world] for b in range(n_batches)]
    if group_by_length is not None:
        rng.shuffle(batches)
    return batches


def epoch_batches(data: list[Tokenized], batch_size: int, rank: int, world: int, seed: int,
                  start_epoch: int = 0, start_batch: int = 0, group_by_length: bool = False,
                  balance_ranks: bool = False) -> Iterator[tuple[int, int, list[Tokenized]]]:
    """Endless (epoch, batch_index, items) stream for one rank, starting at a saved position."""
    epoch, skip = start_epoch, start_batch
    lengths = [len(t) for t in data] if group_by_length or balance_ranks else None
    while True:
        batches = shard_batches(len(data), batch_size, rank, world, seed, epoch,
                                group_by_length=lengths if group_by_length else None,
                                balance_lengths=lengths if balance_ranks else None)
        for b in range(skip, len(batches)):
            yield epoch, b, [data[i] for i in batches[b]]
        epoch, skip = epoch + 1, 0
