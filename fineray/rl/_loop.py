"""The GRPO per-worker loop (`fineray rl`). Reads top to bottom: setup, the visible loop, cleanup.

Launched once per Ray Train worker (or in-process through `LocalSession`). A step on every worker: take
`rl.prompts_per_step / workers` prompts, generate G completions each (rollout actors or the policy), score
them (reward tasks), normalise the rewards per prompt group, then take `rl.iterations` optimizer steps on the
clipped token-level loss. Checkpoints, resume, strategies and the fast path are the training loop's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fineray.rl._grpo import group_advantages, policy_loss, token_weights
from fineray.rl._prompts import PromptItem, build_prompts
from fineray.rl._rollout import Rollout, adapter_files, engine_generate, policy_generate
from fineray.rl.config import parse_rl_config
from fineray.rl.rewards import RewardResult, score_completions
from fineray.train.batches import epoch_batches
from fineray.train.checkpoint import LoopState
from fineray.train.config import RunConfig
from fineray.train.fastpath import apply_fast_path, make_batch, resolve_fast, to_device
from fineray.train.logprobs import adapter_disabled, shifted_targets, token_logps
from fineray.train.loop import make_scheduler, mixed_precision, resume_state, static_metrics, worker_config
from fineray.train.model import count_parameters, load_for_training, pick_dtype
from fineray.train.packing import document_ids
from fineray.train.session import RaySession, Session
from fineray.train.strategies import make_strategy
from fineray.train.templates import IGNORE_INDEX, Tokenized

__all__ = ["policy_batches", "rl_loop", "rl_worker_entry"]


def _seed(seed: int, step: int, rank: int) -> int:
    # Sampling seeds depend only on (seed, step, rank): a resumed run draws the same completions.
    return ((seed * 1_000_003 + step) * 65_537 + rank * 10_007) % (2**62)


def _per_token(batch: dict[str, Any], values: list[float]) -> torch.Tensor:
    """(rows, tokens) tensor holding each document's value on its tokens (padded rows or one packed row)."""
    v = torch.tensor(values, dtype=torch.float32)
    if "cu_seqlens" not in batch:
        return v[:, None].expand_as(batch["labels"]).clone()
    width = batch["labels"].shape[1]
    return torch.cat([v, torch.zeros(1)])[document_ids(batch["cu_seqlens"], width).clamp(max=len(values))][None]


def policy_batches(seqs: list[Tokenized], advantages: list[float], weights: list[float], batch_size: int,
                   pad_id: int, fast: Any) -> list[dict[str, Any]]:
    """Micro-batches of `batch_size` completions (padded, or packed on the fast path), each with per-token
    `advantages` and loss `weights` (0 where nothing trains)."""
    out = []
    for s in range(0, len(seqs), batch_size):
        idx = range(s, min(s + batch_size, len(seqs)))
        b = make_batch([seqs[i] for i in idx], pad_id, fast)
        b["n_docs"] = len(idx)
        b["advantages"] = _per_token(b, [advantages[i] for i in idx])
        b["weights"] = _per_token(b, [weights[i] for i in idx]) * (shifted_targets(b["labels"]) != IGNORE_INDEX)
        out.append(b)
    return out


def rl_loop(cfg: RunConfig, session: Session, adapter_path: str | None = None, resume_from: str | None = None,
            services: dict[str, Any] | None = None) -> LoopState:
    """Run GRPO per `cfg` (`rl:` section) on this worker; returns the final loop state.

    `services`: `rollout_actors` (engine `RolloutWorker` handles; none: the policy generates) and
    `reward_models` (model reference -> `RewardModelWorker` handle), started by the launcher.
    """
    # ---------------------------------------------------------------- setup
    rl, tcfg, services = parse_rl_config(cfg), cfg.train, services or {}
    if tcfg.threads_per_worker:
        torch.set_num_threads(tcfg.threads_per_worker)
    torch.manual_seed(tcfg.seed)
    use_gpu = session.device.type == "cuda"
    tok, model = load_for_training(cfg, use_gpu=use_gpu, adapter_path=adapter_path, device=session.device)
    trainable, total_params = count_parameters(model)
    fast = resolve_fast(cfg, use_gpu, pick_dtype(cfg.model.dtype, use_gpu))
    model = apply_fast_path(model, fast)
    data_stats: dict[str, int] = {}
    train_prompts, val_prompts = build_prompts(cfg, tok, rl.max_new_tokens, data_stats)
    strategy = make_strategy(cfg.train, session, base_name=cfg.model.base)
    model, optimizer = strategy.prepare(model)
    model.train()

    world, group = session.world_size, rl.num_generations
    per_rank = rl.prompts_per_step // world
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * len(train_prompts) / rl.prompts_per_step))
    updates = total_steps * rl.iterations
    scheduler = make_scheduler(optimizer, tcfg.scheduler, int(tcfg.warmup_ratio * updates), updates)
    amp, scaler = mixed_precision(tcfg, use_gpu)
    actors = services.get("rollout_actors") or []
    engine = actors[session.rank % len(actors)] if actors else None
    weights = [r.weight for r in rl.rewards]
    keys = [r.key for r in rl.rewards]
    pad_id = tok.pad_token_id
    ckpt_every = tcfg.checkpoint_every or tcfg.eval_every

    state, _ = resume_state(session, resume_from, strategy, model, optimizer, scheduler,
                            f"GRPO, {len(train_prompts)} train / {len(val_prompts)} val prompts, {per_rank} prompts x "
                            f"{group} completions per worker per step, rollouts by "
                            f"{'engine actors' if engine is not None else 'the policy'}, rewards {keys}, "
                            f"{trainable:,} trainable params, {total_steps} steps")
    static = static_metrics(trainable, total_params, world, total_steps, data_stats)

    def write_ckpt(target: Path) -> None:
        strategy.save(target, model, optimizer, scheduler, state, final=state.step >= total_steps)

    def rollouts(items: list[PromptItem], n: int, temperature: float, seed: int) -> list[Rollout]:
        prompts = [it.ids for it in items for _ in range(n)]
        if engine is None:
            return policy_generate(model, tok, prompts, rl.max_new_tokens, temperature, rl.top_p, seed)
        import ray

        files = ray.put(adapter_files(model))  # the adapter only (megabytes): the engine holds the base
        return engine_generate(engine, f"step{state.step}", files, prompts, rl.max_new_tokens, temperature,
                               rl.top_p, [seed + i for i in range(len(prompts))])

    def score(items: list[PromptItem], outs: list[Rollout], n: int) -> RewardResult:
        rows = [it for it in items for _ in range(n)]
        columns: dict[str, list[Any]] = {"references": [it.reference for it in rows],
                                         "completion_tokens": [len(o.token_ids) for o in outs],
                                         "records": [it.columns for it in rows]}
        for key in sorted({k for it in rows for k in it.columns} - set(columns) - {"prompts", "completions"}):
            columns[key] = [it.columns.get(key) for it in rows]
        conversations = [it.messages + [{"role": "assistant", "content": o.text}] for it, o in zip(rows, outs)]
        return score_completions(rl.rewards, [it.text for it in rows], [o.text for o in outs], columns,
                                 conversations, services.get("reward_models"), rl.reward_chunk, rl.reward_cpus)

    def reward_sums(result: RewardResult, total: torch.Tensor) -> list[float]:
        ok = ~torch.isnan(torch.as_tensor(result.scores))
        per_fn = torch.nan_to_num(torch.as_tensor(result.scores), nan=0.0).sum(0)
        return [float(total.sum()), float((total ** 2).sum()), float(len(total)),
                *per_fn.tolist(), *ok.sum(0).tolist(), *[float(len(result.failures.get(k, []))) for k in keys]]

    def evaluate() -> dict[str, float]:
        """Greedy completions of the first `rl.eval_prompts` validation prompts, scored: the reward curve."""
        mine = val_prompts[: rl.eval_prompts][session.rank::world]
        outs = rollouts(mine, 1, 0.0, _seed(tcfg.seed, state.step, session.rank)) if mine else []
        res = score(mine, outs, 1) if mine else RewardResult(np.zeros((0, len(keys))), keys)
        s = session.all_reduce_sum(reward_sums(res, torch.tensor(res.total(weights), dtype=torch.float32)))
        n_fn = len(keys)
        return {"val_reward_mean": s[0] / max(s[2], 1),
                **{f"val_reward_{k}": v / max(c, 1) for k, v, c in zip(keys, s[3:3 + n_fn], s[3 + n_fn:3 + 2 * n_fn])}}

    # ---------------------------------------------------------------- loop
    if tcfg.eval_on_start and val_prompts and rl.eval_prompts and state.step == 0:
        state.history.append({"step": 0, **evaluate()})
        if session.rank == 0:
            print("[fineray] before training: " + " ".join(f"{k}={v:.4g}" for k, v in state.history[-1].items()
                                                        if isinstance(v, float)), flush=True)
    stream = epoch_batches(train_prompts, per_rank, session.rank, world, tcfg.seed, state.epoch, state.batch_in_epoch)
    while state.step < total_steps:
        epoch, b_idx, items = next(stream)
        t0 = time.perf_counter()
        outs = rollouts(items, group, rl.temperature, _seed(tcfg.seed, state.step, session.rank))
        t_rollout = time.perf_counter()
        result = score(items, outs, group)
        rewards = torch.tensor(result.total(weights), dtype=torch.float32)
        t_reward = time.perf_counter()
        if session.rank == 0:
            for key, msgs in result.failures.items():
                print(f"[fineray] reward {key}: {len(msgs)} failed call(s) at step {state.step + 1}: {msgs[0]}",
                      flush=True)

        # One sequence per completion: prompt + completion, labels on the completion tokens that train.
        advantages = group_advantages(rewards, group, rl.scale_rewards).tolist()
        seqs = [Tokenized(it.ids + o.token_ids, [IGNORE_INDEX] * len(it.ids) + (
            [IGNORE_INDEX] * len(o.token_ids) if rl.mask_truncated and o.finish_reason == "length" else o.token_ids))
            for it, o in zip([it for it in items for _ in range(group)], outs)]
        batches = [to_device(b, session.device) for b in
                   policy_batches(seqs, advantages, token_weights([s.num_target_tokens for s in seqs], rl.loss),
                                  tcfg.batch_size, pad_id, fast)]
        with torch.no_grad():  # the sampling policy's and the reference's log-probs, before any update
            old = [token_logps(model, b, fast) for b in batches] if rl.iterations > 1 else None
            ref = None
            if rl.beta:
                with adapter_disabled(model) as base:
                    ref = [token_logps(base, b, fast) for b in batches]
        loss_sum, st_sum = 0.0, {"kl": 0.0, "clipped": 0.0, "tokens": 0.0}
        for _ in range(rl.iterations):
            for c, batch in enumerate(batches):
                with strategy.no_sync(model, c == len(batches) - 1), amp():
                    logp = token_logps(model, batch, fast)
                    loss, st = policy_loss(logp, old[c] if old else logp.detach(), batch["advantages"],
                                           batch["weights"], epsilon=rl.epsilon, epsilon_high=rl.epsilon_high,
                                           beta=rl.beta, ref_logp=ref[c] if ref else None)
                strategy.backward(loss, scaler)
                loss_sum += float(loss.detach()) / rl.iterations
                for k in st_sum:
                    st_sum[k] += float(st[k]) / rl.iterations
            grad_norm = strategy.step(model, optimizer, scaler)
            scheduler.step()
        t_train = time.perf_counter()
        state.step += 1
        state.epoch, state.batch_in_epoch = epoch, b_idx + 1

        # Metrics over every worker: rewards (total and per function), lengths, KL, clipping, the time split.
        lengths = [len(o.token_ids) for o in outs]
        sums = session.all_reduce_sum(reward_sums(result, rewards) + [
            float(sum(lengths)), float(sum(o.finish_reason == "length" for o in outs)),
            st_sum["kl"], st_sum["clipped"], st_sum["tokens"], loss_sum])
        n_fn = len(keys)
        tot, sq, n = sums[:3]
        per_fn, ok, failed = sums[3:3 + n_fn], sums[3 + n_fn:3 + 2 * n_fn], sums[3 + 2 * n_fn:3 + 3 * n_fn]
        length_sum, truncated, kl, clipped, tokens, loss_all = sums[3 + 3 * n_fn:]
        row: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "train_loss": loss_all / world,
                               "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                               "reward_mean": tot / n, "reward_std": math.sqrt(max(sq / n - (tot / n) ** 2, 0.0))}
        for k, s_, o_, f_ in zip(keys, per_fn, ok, failed):
            row[f"reward_{k}"] = s_ / max(o_, 1)
            if f_:
                row[f"reward_{k}_failed"] = int(f_)
        row.update({"completion_len": length_sum / n, "truncated": truncated / n, "kl": kl / max(tokens, 1),
                    "clip_frac": clipped / max(tokens, 1), "rollout_s": t_rollout - t0, "reward_s": t_reward - t_rollout,
                    "train_s": t_train - t_reward, "tokens_per_s": tokens / max(t_train - t0, 1e-9)})
        last = state.step == total_steps
        if val_prompts and rl.eval_prompts and (state.step % tcfg.eval_every == 0 or last):
            row.update(evaluate())
        state.history.append(row)
        if session.rank == 0:
            session.progress({**row, "total_steps": total_steps})
            print("[fineray] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items()), flush=True)
        if last or state.step % ckpt_every == 0 or "val_reward_mean" in row:
            strategy.report(session, {**static, **row, "done": last, "stop_reason": None}, write_ckpt)
    # ---------------------------------------------------------------- cleanup
    if use_gpu:
        torch.cuda.empty_cache()
    return state


def rl_worker_entry(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker` for GRPO."""
    cfg = worker_config(config)
    rl_loop(cfg, RaySession(config.get("progress_board")), adapter_path=config.get("adapter_path"),
            resume_from=config.get("resume_from"), services=config.get("rl_services"))
