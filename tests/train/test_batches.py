"""Per-rank batches: token-balanced dealing across ranks and token-capped micro-batch chunks."""

import pytest

from fineray.train.batches import balance, shard_batches, split_by_tokens
from fineray.train.templates import Tokenized


def test_balance_deals_the_same_items_with_equal_counts_and_near_equal_tokens():
    # Prepare: one step of 8 items over 2 ranks, lengths very uneven
    lengths = [1000, 10, 20, 900, 30, 40, 50, 60]
    # Execute
    ranks = balance(list(range(8)), lengths, 2)
    # Assert: same set, 4 each, loads 1070 vs 1040 (round-robin: 1000+20+30+50=1100 vs 1010)
    assert sorted(i for r in ranks for i in r) == list(range(8))
    assert [len(r) for r in ranks] == [4, 4]
    assert sorted(sum(lengths[i] for i in r) for r in ranks) == [1040, 1070]


def test_shard_batches_balanced_keeps_each_steps_items_and_is_deterministic():
    lengths = [(i * 37) % 500 + 5 for i in range(64)]
    plain = [shard_batches(64, 4, r, 2, seed=1, epoch=0) for r in range(2)]
    bal = [shard_batches(64, 4, r, 2, seed=1, epoch=0, balance_lengths=lengths) for r in range(2)]
    assert bal == [shard_batches(64, 4, r, 2, seed=1, epoch=0, balance_lengths=lengths) for r in range(2)]
    for step in range(len(plain[0])):
        assert sorted(plain[0][step] + plain[1][step]) == sorted(bal[0][step] + bal[1][step])
        assert len(bal[0][step]) == len(bal[1][step]) == 4
    gap = lambda b: sum(abs(sum(lengths[i] for i in b[0][s]) - sum(lengths[i] for i in b[1][s]))  # noqa: E731
                        for s in range(len(b[0])))
    assert gap(bal) < gap(plain) / 3


def _items(*lengths: int) -> list[Tokenized]:
    return [Tokenized(list(range(n)), list(range(n))) for n in lengths]


@pytest.mark.parametrize(("cap", "expected"), [(None, [[5, 7, 3, 9]]), (12, [[5, 7], [3, 9]]),
                                               (10, [[5], [7, 3], [9]]), (4, [[5], [7], [3], [9]])])
def test_split_by_tokens_keeps_documents_whole_and_in_order(cap, expected):
    chunks = split_by_tokens(_items(5, 7, 3, 9), cap)
    assert [[len(t) for t in c] for c in chunks] == expected
