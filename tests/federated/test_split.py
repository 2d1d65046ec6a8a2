"""Dirichlet non-IID split: exact partition, non-empty silos, label skew driven by alpha."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fineray.federated.split import dirichlet_split, dirichlet_split_indices

RECORDS = [{"id": i, "label": f"c{i % 5}"} for i in range(1000)]


def _max_label_share(silos: list[list[dict]]) -> float:
    """Mean over silos of the share of the silo's most common label (1.0 = single-label silos)."""
    return float(np.mean([Counter(r["label"] for r in s).most_common(1)[0][1] / len(s) for s in silos]))


def test_split_covers_all_records_exactly_once_and_silos_non_empty():
    # Execute
    silos = dirichlet_split(RECORDS, num_silos=7, alpha=0.5, label_key="label", seed=3)
    # Assert
    ids = sorted(r["id"] for s in silos for r in s)
    assert ids == list(range(1000))
    assert len(silos) == 7 and all(silos)


def test_small_alpha_skews_labels_large_alpha_is_near_iid():
    # Execute
    skewed = dirichlet_split(RECORDS, num_silos=5, alpha=0.05, label_key="label", seed=0)
    iid = dirichlet_split(RECORDS, num_silos=5, alpha=1000.0, label_key=lambda r: r["label"], seed=0)
    # Assert: 5 balanced labels give a max-label share of ~0.2 when IID.
    assert _max_label_share(skewed) > 0.6
    assert _max_label_share(iid) < 0.3


def test_split_is_deterministic_and_handles_tiny_alpha_with_few_records():
    # Prepare: 6 records of a single label over 6 silos: Dirichlet(0.01) almost surely leaves
    # silos empty, so the fallback must hand each one a record.
    labels = ["x"] * 6
    # Execute
    first = dirichlet_split_indices(labels, num_silos=6, alpha=0.01, seed=1, max_retries=2)
    again = dirichlet_split_indices(labels, num_silos=6, alpha=0.01, seed=1, max_retries=2)
    # Assert
    assert first == again
    assert sorted(i for s in first for i in s) == list(range(6)) and all(len(s) == 1 for s in first)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split_indices(["x"] * 3, num_silos=4, alpha=1.0)
