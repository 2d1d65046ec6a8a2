"""Metric functions against hand-computed values."""

import math

import pytest

from fineray.train.metrics import (
    bleu,
    compute_metrics,
    exact_match,
    field_accuracy,
    json_valid,
    parse_json_object,
    perplexity,
    rouge_l,
)


def test_exact_match():
    assert exact_match(["a ", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat down") = 3; P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7.
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)


def test_bleu_identity_and_disjoint():
    assert bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    assert bleu(["aaa bbb ccc ddd"], ["www xxx yyy zzz"]) == pytest.approx(0.0)


def test_json_metrics():
    refs = ['{"a": 1, "b": "x"}', '{"a": 2, "b": "y"}']
    preds = ['Sure! {"a": 1, "b": "z"}', "not json"]
    assert json_valid(preds) == 0.5
    assert field_accuracy(preds, refs) == pytest.approx(1 / 4)
    assert parse_json_object('```json\n{"k": [1]}\n```') == {"k": [1]}


def test_perplexity():
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_compute_metrics_rejects_unknown():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["nope"], ["a"], ["a"])
    with pytest.raises(ValueError, match="1 predictions vs 2"):
        exact_match(["a"], ["a", "b"])
