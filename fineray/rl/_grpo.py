"""GRPO maths: group-normalised advantages and the clipped token-level policy loss (pure torch).

Advantages (Shao et al. 2024): a prompt's G completions form a group; each completion's advantage is its
reward minus the group mean, divided by the group's standard deviation (unless `scale_rewards` is off,
as Dr. GRPO recommends). Every token of a completion shares its advantage.

Loss per token (PPO's clipped surrogate, Schulman et al. 2017) with ratio r = exp(logp - logp_old):
    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * KL_t,
    KL_t = exp(ref - logp) - (ref - logp) - 1        (the k3 estimator, >= 0; Schulman 2020)
averaged over all completion tokens of the worker's batch (`token`, DAPO) or per completion first
(`sequence`, the original GRPO): both are a weighted sum with per-token weights (`token_weights`).
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "policy_loss", "token_weights"]


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(n,) rewards of n / group groups of consecutive completions -> (n,) advantages."""
    r = rewards.view(-1, group)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, *,
                epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO loss of one micro-batch.

    Args:
        logp, old_logp, ref_logp: (rows, tokens) per-token log-probs of the policy (with grad), of the policy
            that sampled the completions, and of the reference.
        advantages: (rows,) per completion, or (rows, tokens) per token (packed rows).
        weights: (rows, tokens) each token's weight in the batch mean, 0 where nothing trains (`token_weights`):
            micro-batch losses add up to the loss of the whole batch.

    Returns:
        The loss and the summed (over trained tokens, so micro-batches add up) `kl`, `clipped` and `tokens`.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = (weights > 0).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = (advantages if advantages.dim() == 2 else advantages[:, None]).to(logp.dtype)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + eps_high) * a)
    kl = torch.zeros_like(logp)
    if beta and ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    loss = (per_token * weights.to(logp.dtype)).sum()
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    stats = {"kl": (kl.detach() * mask).sum(), "clipped": (clipped.to(mask.dtype) * mask).sum(),
             "tokens": mask.sum()}
    return loss, stats


def token_weights(lengths: list[int], loss_type: str) -> list[float]:
    """Per-token weight of each completion (`lengths`: its trained tokens) in the batch loss: `token`: 1 / all
    tokens (every token counts the same, DAPO); `sequence`: 1 / (its tokens x completions) (a mean per
    completion first, the original GRPO)."""
    if loss_type == "token":
        total = max(sum(lengths), 1)
        return [1.0 / total] * len(lengths)
    return [1.0 / (max(n, 1) * len(lengths)) for n in lengths]
