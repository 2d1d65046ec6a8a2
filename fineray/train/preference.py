"""Preference objectives: DPO, IPO, ORPO, SimPO and the Bradley-Terry reward-model loss.

The losses (per pair, from summed log-probs; "avg" is the per-token mean of a response):
  * dpo:    -(1-e) log s(b h) - e log s(-b h),  h = (pi_c - ref_c) - (pi_r - ref_r)   (Rafailov et al. 2023;
            e = label smoothing, conservative DPO)
  * ipo:    (h_avg - 1/(2b))^2 with per-token mean log-probs                          (Azar et al. 2023)
  * orpo:   -avg_c - b log s(log odds_c - log odds_r), odds = p/(1-p) of avg         (Hong et al. 2024)
  * simpo:  -(1-e) log s(b (avg_c - avg_r) - g) - e log s(-(...))                    (Meng et al. 2024)
  * reward: -log s(score_c - score_r - margin)                                        (Bradley-Terry)
`dpo.rpo_alpha` > 0 adds rpo_alpha x the chosen response's per-token NLL to dpo/ipo (RPO, Pang et al. 2024).
Implicit rewards are b (pi - ref) for DPO/IPO, b avg for ORPO/SimPO, the scores for a reward model; reward
accuracy is the share of pairs whose chosen reward is higher, preference accuracy the share whose chosen
response the policy itself finds likelier (summed log-probs, no reference).

`PreferenceObjective` is what the training loop calls for these objectives (load the model, build pair
data, batch, loss and metrics, evaluate); the supervised objective is the loop's default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fineray.train.config import RunConfig
from fineray.train.fastpath import FastPath, to_device
from fineray.train.logprobs import adapter_disabled, document_sums, token_logps
from fineray.train.pairs import Pair, pair_batch, tokenize_pairs

__all__ = ["PREFERENCE_METRICS", "PreferenceObjective", "build_pair_data", "preference_loss"]

#: Metrics per pair, reported as `train_<name>` every step and `val_<name>` at every eval.
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logp_chosen",
                      "logp_rejected", "preference_accuracy", "kl")
_WITH_REFERENCE = ("dpo", "ipo")


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def preference_loss(objective: str, chosen: torch.Tensor, rejected: torch.Tensor, *,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                    reward_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit (chosen, rejected) rewards.

    Args:
        objective: dpo | ipo | orpo | simpo | reward.
        chosen, rejected: (pairs,) summed response log-probs of the policy (scores for `reward`).
        ref_chosen, ref_rejected: the reference's summed log-probs (dpo, ipo).
        chosen_tokens, rejected_tokens: response token counts (ipo, orpo, simpo use per-token means).
    """
    if objective == "reward":
        return -F.logsigmoid(chosen - rejected - reward_margin), chosen, rejected
    if objective in _WITH_REFERENCE:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"objective {objective} needs reference log-probs")
        if objective == "dpo":
            rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
            return _smoothed(rc - rr, label_smoothing), rc, rr
        ac, ar = (chosen - ref_chosen) / chosen_tokens, (rejected - ref_rejected) / rejected_tokens
        return (ac - ar - 1 / (2 * beta)) ** 2, beta * ac, beta * ar
    if chosen_tokens is None or rejected_tokens is None:
        raise ValueError(f"objective {objective} needs the response token counts")
    ac, ar = chosen / chosen_tokens, rejected / rejected_tokens
    if objective == "simpo":
        return _smoothed(beta * (ac - ar) - simpo_gamma, label_smoothing), beta * ac, beta * ar
    if objective == "orpo":
        # log odds = log p - log(1 - p) of the per-token mean probability; expm1 keeps it finite near p = 1
        def log_odds(a: torch.Tensor) -> torch.Tensor:
            return a - torch.log(-torch.expm1(a.clamp(max=-1e-6)))

        return -ac - beta * F.logsigmoid(log_odds(ac) - log_odds(ar)), beta * ac, beta * ar
    raise ValueError(f"unknown preference objective {objective!r}")


def build_pair_data(cfg: RunConfig, tokenizer: Any, stats: dict[str, int] | None = None
                    ) -> tuple[list[Pair], list[Pair]]:
    """Load, normalise and tokenise the training and validation pairs (bad records named by file and line)."""
    from fineray.train.data import load_train_val

    stats = stats if stats is not None else {}
    train_ex, val_ex = load_train_val(cfg.data, cfg.train.seed, stats)
    d, mp = cfg.data, cfg.dpo.max_prompt_len
    train = tokenize_pairs(tokenizer, train_ex, d.max_seq_len, mp, stats, "train_")
    val = tokenize_pairs(tokenizer, val_ex, d.max_seq_len, mp, stats, "val_")
    if d.max_examples:
        train = train[: d.max_examples]
    if not train:
        raise ValueError(f"no training pair fits data.max_seq_len={d.max_seq_len}")
    return train, val


class PreferenceObjective:
    """The training loop's hooks for a preference objective (`cfg.objective` other than `sft`).

    Args:
        cfg: the run config.
        reference: precomputed reference log-probs by pair key (`reference.precompute_reference`); when the
            objective needs them and none are given, `prepare` computes them in this worker.
    """

    def __init__(self, cfg: RunConfig, reference: dict[str, tuple[float, float]] | None = None) -> None:
        from fineray.train.reference import needs_precomputed_reference

        self.name = cfg.objective
        self.pcfg = cfg.dpo
        self.beta = cfg.dpo.beta_for(cfg.objective)
        self.reference = reference
        self.precomputed = needs_precomputed_reference(cfg)
        self.is_reward = cfg.objective == "reward"

    def load_model(self, cfg: RunConfig, **kwargs: Any) -> tuple[Any, torch.nn.Module]:
        """Tokenizer and trainable model (a scalar-head model for `reward`)."""
        if self.is_reward:
            from fineray.train.reward_model import load_reward_for_training

            return load_reward_for_training(cfg, **kwargs)
        from fineray.train.model import load_for_training

        return load_for_training(cfg, **kwargs)

    def build_data(self, cfg: RunConfig, tokenizer: Any, stats: dict[str, int]) -> tuple[list[Pair], list[Pair]]:
        train, val = build_pair_data(cfg, tokenizer, stats)
        if self.reference is not None:
            for p in train + val:
                p.ref = self.reference.get(p.key)
            missing = sum(p.ref is None for p in train + val)
            if missing:
                raise RuntimeError(f"{missing} pairs have no precomputed reference log-probs (the data changed "
                                   "between the reference pass and training?)")
        return train, val

    def prepare(self, model: torch.nn.Module, pairs: list[Pair], pad_id: int, device: torch.device,
                batch_size: int) -> None:
        """Before training: compute the reference log-probs with the starting weights when they are needed and
        were not handed over (a local session)."""
        if not self.precomputed or all(p.ref is not None for p in pairs):
            return
        from fineray.train.reference import pair_reference_logps

        for p, ref in zip(pairs, pair_reference_logps(model, pairs, pad_id, batch_size, device)):
            p.ref = ref

    def make_batch(self, items: list[Pair], pad_id: int, fast: FastPath) -> dict[str, Any]:
        return pair_batch(items, pad_id, fast, left_padded=self.is_reward)

    def _reference(self, model: torch.nn.Module, batch: dict[str, Any], fast: FastPath) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), adapter_disabled(model) as base:
            ref = document_sums(token_logps(base, batch, fast), batch)[0]
        # The frozen base never changes: keep each pair's reference, so the next epoch and every later
        # evaluation skip this forward (two host floats per pair).
        n, values = batch["n_target"], ref.tolist()
        for p, c, r in zip(batch.get("pairs", []), values[:n], values[n:]):
            p.ref = (c, r)
        return ref

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], fast: FastPath
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the batch's pairs and the per-pair metric means (detached)."""
        n = batch["n_target"]
        if self.is_reward:
            from fineray.train.reward_model import score_batch

            scores = score_batch(model, batch)
            losses, rc, rr = preference_loss("reward", scores[:n], scores[n:], reward_margin=self.pcfg.reward_margin)
            return losses.mean(), _metrics(rc, rr)
        ref = self._reference(model, batch, fast) if self.name in _WITH_REFERENCE else None
        sums, counts = document_sums(token_logps(model, batch, fast), batch)
        kw: dict[str, Any] = {"chosen_tokens": counts[:n], "rejected_tokens": counts[n:], "beta": self.beta,
                              "label_smoothing": self.pcfg.label_smoothing, "simpo_gamma": self.pcfg.simpo_gamma}
        if ref is not None:
            kw.update(ref_chosen=ref[:n], ref_rejected=ref[n:])
        losses, rc, rr = preference_loss(self.name, sums[:n], sums[n:], **kw)
        if self.pcfg.rpo_alpha and self.name in _WITH_REFERENCE:
            losses = losses - self.pcfg.rpo_alpha * sums[:n] / counts[:n].clamp(min=1)
        metrics = _metrics(rc, rr)
        metrics["logp_chosen"], metrics["logp_rejected"] = sums[:n].detach().mean(), sums[n:].detach().mean()
        metrics["preference_accuracy"] = (sums[:n] > sums[n:]).float().mean()
        if ref is not None:  # sequence-level log-ratio to the reference, averaged over both responses
            metrics["kl"] = (sums.detach() - ref).mean()
        return losses.mean(), metrics

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: list[Pair], session: Any, batch_size: int, pad_id: int,
                 fast: FastPath, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss and metrics: pair-weighted means over every rank's shard."""
        model.eval()
        idx = list(range(len(data)))[session.rank::session.world_size]
        batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)][:max_batches]
        names = ("loss",) + PREFERENCE_METRICS
        sums = dict.fromkeys(names, 0.0)
        pairs = 0
        for b in batches:
            batch = to_device(self.make_batch([data[i] for i in b], pad_id, fast), session.device)
            loss, metrics = self.loss(model, batch, fast)
            n = batch["n_target"]
            sums["loss"] += float(loss) * n
            for k, v in metrics.items():
                sums[k] += float(v) * n
            pairs += n
        model.train()
        totals = session.all_reduce_sum([sums[k] for k in names] + [pairs])
        n_all = max(totals[-1], 1)
        out = {f"val_{k}": v / n_all for k, v in zip(names, totals[:-1])}
        if self.name not in _WITH_REFERENCE:
            out.pop("val_kl")
        if self.is_reward:
            for k in ("val_logp_chosen", "val_logp_rejected", "val_preference_accuracy"):
                out.pop(k)
        return out


def _metrics(rc: torch.Tensor, rr: torch.Tensor) -> dict[str, torch.Tensor]:
    rc, rr = rc.detach(), rr.detach()
    return {"reward_accuracy": (rc > rr).float().mean(), "reward_margin": (rc - rr).mean(),
            "chosen_reward": rc.mean(), "rejected_reward": rr.mean()}
