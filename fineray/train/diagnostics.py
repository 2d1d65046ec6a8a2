"""Training-curve diagnostics, as a fine-tuning guide would read the curves.

Each check returns a finding with a plain-language hint:
* overfitting: validation loss rising over the last evals while training loss keeps falling;
* plateau: training loss stops improving early (the first half of the run reached the final level);
* erratic: step-to-step training loss jumps large relative to its level (learning rate too high?).
Preference runs (rows with `val_reward_margin`) are also checked for
* margin_explodes: the reward margin grew past what separating the pairs needs (over-optimisation), or the
  chosen responses' log-probs fell while the margin grew (both sides pushed down: likelihood displacement);
* accuracy_stalls: reward accuracy flat and low over the last evals.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

__all__ = ["diagnose"]


def _smooth(xs: list[float], k: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def diagnose(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Findings for a metric history (rows with `train_loss` and sometimes `val_loss`)."""
    findings: list[dict[str, str]] = []
    train = [r["train_loss"] for r in history if "train_loss" in r]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    if len(val) >= 3 and len(train) >= 6:
        third = max(2, len(train) // 3)
        rising = val[-1] > val[-2] > val[-3] or val[-1] > min(val) * 1.05
        train_falling = statistics.fmean(train[-third:]) < statistics.fmean(train[-2 * third:-third])
        if rising and train_falling:
            findings.append({"kind": "overfitting", "message":
                             f"validation loss rose to {val[-1]:.4f} (best {min(val):.4f}) while training loss "
                             "kept falling: use fewer steps, early stopping, more data or more dropout"})
    if len(train) >= 10:
        sm = _smooth(train, max(2, len(train) // 10))
        drop_total = sm[0] - sm[-1]
        half = sm[len(sm) // 2]
        if drop_total > 0 and (sm[0] - half) > 0.95 * drop_total and (half - sm[-1]) < 0.02 * abs(sm[0]):
            findings.append({"kind": "plateau", "message":
                             "training loss stopped improving by mid-run: the remaining steps add little; "
                             "try a higher learning rate or larger rank, or train shorter"})
        # Step-to-step noise of the second half (after the initial descent), against the loss level there;
        # noise below 5% of the starting loss is a converged run's jitter, not a problem to report.
        tail = train[len(train) // 2:]
        jumps = [abs(b - a) for a, b in itertools.pairwise(tail)]
        level, noise = statistics.fmean(tail), statistics.fmean(jumps)
        if level > 0 and noise > 0.25 * level and noise > 0.05 * abs(train[0]):
            findings.append({"kind": "erratic", "message":
                             "training loss jumps a lot between steps: lower train.lr, raise batch_size or "
                             "grad_accum, or enable train.grad_clip"})
    return findings + _preference_findings(history)


# A margin of 10 reward units means the chosen response is e^10 times likelier (relative to the reference)
# than the rejected one: far past separating the pairs, so the rest only moves the policy away.
_MARGIN_LIMIT = 10.0
_DISPLACED_NATS = 10.0  # a 35-token answer 10 nats less likely: greedy decoding may no longer produce it


def _preference_findings(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    evals = [r for r in history if "val_reward_margin" in r]
    findings: list[dict[str, str]] = []
    if not evals:
        return findings
    first, last = evals[0], evals[-1]
    margin = last["val_reward_margin"]
    if margin > _MARGIN_LIMIT:
        findings.append({"kind": "margin_explodes", "message":
                         f"the validation reward margin reached {margin:.1f}: far past what separating the pairs "
                         "needs; raise dpo.beta, lower train.lr or train fewer steps"})
    elif ("val_logp_chosen" in last and len(evals) >= 2 and margin > first["val_reward_margin"]
          and last["val_logp_chosen"] < first["val_logp_chosen"] - _DISPLACED_NATS):
        findings.append({"kind": "margin_explodes", "message":
                         f"the margin grew while the chosen responses' log-prob fell by "
                         f"{first['val_logp_chosen'] - last['val_logp_chosen']:.1f} nats (both sides pushed "
                         "down): consider objective=ipo, a larger dpo.beta, or an SFT term (objective=orpo)"})
    acc = [r["val_reward_accuracy"] for r in evals[-3:]]
    if len(evals) >= 3 and max(acc) - min(acc) < 0.02 and acc[-1] < 0.6:
        findings.append({"kind": "accuracy_stalls", "message":
                         f"validation reward accuracy stalled at {acc[-1]:.2f} over the last 3 evals: raise "
                         "train.lr, check that chosen and rejected differ in the data, or lower dpo.beta"})
    return findings
