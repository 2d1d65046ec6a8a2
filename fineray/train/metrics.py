"""Text metrics for held-out evaluation. Pure functions over strings; ROUGE-L and BLEU from maintained libraries.

* exact_match: stripped prediction == stripped reference.
* rouge_l: ROUGE-L F1 (`rouge-score`, the reference implementation of Lin 2004), averaged over examples.
* bleu: corpus BLEU (`sacrebleu`, Post 2018), 0-100.
* json_valid: share of predictions that parse as a JSON object.
* field_accuracy: share of the reference's JSON fields the prediction reproduces exactly (0 if not JSON).
* perplexity: exp of a token-weighted mean negative log-likelihood.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

__all__ = [
    "METRICS",
    "bleu",
    "compute_metrics",
    "exact_match",
    "field_accuracy",
    "json_valid",
    "parse_json_object",
    "perplexity",
    "rouge_l",
]


def _check(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    _check(preds, refs)
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(preds)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    _check(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    _check(preds, refs)
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences), or None."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def json_valid(preds: Sequence[str], refs: Sequence[str] | None = None) -> float:
    if not preds:
        raise ValueError("no predictions to score")
    return sum(parse_json_object(p) is not None for p in preds) / len(preds)


def field_accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    _check(preds, refs)
    hit = total = 0
    for p, r in zip(preds, refs):
        ref = parse_json_object(r)
        if ref is None:
            continue
        pred = parse_json_object(p) or {}
        total += len(ref)
        hit += sum(1 for k, v in ref.items() if k in pred and pred[k] == v)
    return hit / total if total else 0.0


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(total NLL / tokens); capped at exp(50) to stay finite."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(min(nll_sum / tokens, 50.0))


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu, "json_valid": json_valid,
           "field_accuracy": field_accuracy}


def compute_metrics(names: Sequence[str], preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """The named metrics; unknown names are an error listing the known ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {n: METRICS[n](preds, refs) for n in names}
