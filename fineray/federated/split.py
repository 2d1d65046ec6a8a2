"""Non-IID partition of a dataset across silos with a per-label Dirichlet prior.

The common simulation protocol of Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv 1909.06335): for every label, draw silo
proportions ``p ~ Dir(alpha * 1_n)`` and deal that label's records accordingly. Small ``alpha``
(e.g. 0.1) gives each silo few labels; large ``alpha`` (e.g. 100) approaches an IID split.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["dirichlet_split", "dirichlet_split_indices"]

T = TypeVar("T")


def dirichlet_split_indices(
    labels: Sequence[Hashable], num_silos: int, alpha: float, seed: int = 0, max_retries: int = 100
) -> list[list[int]]:
    """Partitions ``range(len(labels))`` into ``num_silos`` non-empty, label-skewed parts.

    Args:
        labels: One hashable label per record.
        num_silos: Number of silos ``n``.
        alpha: Dirichlet concentration (> 0).
        seed: Seed of the numpy generator; same inputs and seed give the same split.
        max_retries: Redraws while some silo is empty; after that, the largest silo donates
            one record to each empty silo (deterministic).

    Returns:
        ``n`` sorted index lists covering every index exactly once.

    Raises:
        ValueError: If ``alpha <= 0``, ``num_silos < 1`` or there are fewer records than silos.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_silos < 1:
        raise ValueError(f"num_silos must be >= 1, got {num_silos}")
    if len(labels) < num_silos:
        raise ValueError(f"cannot give {num_silos} silos a record each from {len(labels)} records")
    groups: dict[Hashable, list[int]] = {}  # first-appearance order: deterministic, no label sorting
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    rng = np.random.default_rng(seed)
    silos: list[list[int]] = []
    for _ in range(max(1, max_retries)):
        silos = [[] for _ in range(num_silos)]
        for members in groups.values():
            idx = rng.permutation(np.asarray(members))
            props = rng.dirichlet(np.full(num_silos, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for silo, part in zip(silos, np.split(idx, cuts), strict=True):
                silo.extend(int(i) for i in part)
        if all(silos):
            break
    for silo in silos:
        if not silo:
            donor = max(silos, key=len)
            silo.append(donor.pop())
    return [sorted(s) for s in silos]


def dirichlet_split(
    records: Sequence[T],
    num_silos: int,
    alpha: float,
    label_key: str | Callable[[T], Hashable],
    seed: int = 0,
) -> list[list[T]]:
    """Splits ``records`` across silos by label with :func:`dirichlet_split_indices`.

    Args:
        records: Records (e.g. dicts); order within a silo follows the input order.
        num_silos: Number of silos.
        alpha: Dirichlet concentration.
        label_key: Key of the label in mapping records, or a function returning it.
        seed: Random seed.

    Returns:
        One list of records per silo; every record appears in exactly one silo.
    """

    def get(record: Any) -> Hashable:
        if callable(label_key):
            return label_key(record)
        if not isinstance(record, Mapping):
            raise TypeError("label_key is a string but records are not mappings; pass a callable")
        return record[label_key]

    parts = dirichlet_split_indices([get(r) for r in records], num_silos, alpha, seed)
    return [[records[i] for i in part] for part in parts]
