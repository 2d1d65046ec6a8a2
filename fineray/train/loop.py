"""The per-worker training loop. Reads top to bottom: setup, the visible loop, cleanup.

Launched once per Ray Train worker by `launcher.py` (or in-process through `LocalSession`). All ranks run the
same code; rank 0 writes checkpoints. Steps count optimizer updates; one step consumes `grad_accum`
micro-batches of `batch_size` sequences (preference objectives: pairs) on every worker.

What depends on `objective` (model head, data, batches, loss, evaluation) sits behind one object: the
supervised default below, or `preference.PreferenceObjective` for dpo | ipo | orpo | simpo | reward.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fineray.train.batches import collate, epoch_batches, shard_batches, split_by_tokens
from fineray.train.checkpoint import LoopState, unwrap
from fineray.train.config import RunConfig, TrainConfig
from fineray.train.data import load_train_val
from fineray.train.fastpath import apply_fast_path, forward_loss, make_batch, resolve_fast, to_device
from fineray.train.model import count_parameters, load_for_training, pick_dtype
from fineray.train.session import RaySession, Session
from fineray.train.strategies import make_strategy
from fineray.train.templates import Tokenized, tokenize_all

__all__ = ["build_data", "evaluate_loss", "make_objective", "make_scheduler", "mixed_precision",
           "ray_worker_entry", "resume_state", "static_metrics", "train_loop",
           "worker_config"]


def build_data(cfg: RunConfig, tokenizer: Any, stats: dict[str, int] | None = None
               ) -> tuple[list[Tokenized], list[Tokenized]]:
    """Load, normalise, tokenise and length-filter the train and validation sets."""
    stats = stats if stats is not None else {}
    train_ex, val_ex = load_train_val(cfg.data, cfg.train.seed, stats)
    d = cfg.data
    train = tokenize_all(tokenizer, train_ex, d.max_seq_len, d.train_on_prompt, stats, "train_")
    val = tokenize_all(tokenizer, val_ex, d.max_seq_len, d.train_on_prompt, stats, "val_")
    if d.max_examples:
        train = train[: d.max_examples]
    if not train:
        raise ValueError(f"no training example fits data.max_seq_len={d.max_seq_len}")
    return train, val


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    """Linear warmup then linear decay / cosine decay / constant."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mixed_precision(tcfg: TrainConfig, use_gpu: bool) -> tuple[Any, Any]:
    """(autocast context factory, fp16 grad scaler or None) for `train.precision` (`auto`: bf16 on GPU)."""
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.precision)
    if tcfg.precision == "auto" and use_gpu:
        autocast_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 and use_gpu else None
    amp = (lambda: torch.autocast("cuda", dtype=autocast_dtype)) if use_gpu and autocast_dtype else contextlib.nullcontext
    return amp, scaler


def _padded_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over a padded (`collate`) batch's target tokens through the plain HF forward, and how many
    target tokens there were. (Training batches from `make_batch` go through `fastpath.forward_loss`.)"""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    return out.loss, n_target


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: list[Tokenized], session: Session, batch_size: int,
                  pad_id: int, max_batches: int | None = None) -> float:
    """Validation loss: token-weighted mean over every rank's shard (exact, not a mean of means)."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    idx = list(range(len(data)))[session.rank::session.world_size]
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)][:max_batches]
    for b in batches:
        batch = {k: v.to(session.device) for k, v in collate([data[i] for i in b], pad_id).items()}
        loss, n = _padded_batch_loss(model, batch)
        loss_sum += float(loss) * n
        tokens += n
    model.train()
    loss_sum, tokens = session.all_reduce_sum([loss_sum, tokens])
    return loss_sum / max(tokens, 1)


class _Supervised:
    """The default objective (`sft`): next-token cross-entropy on the response tokens."""

    def load_model(self, cfg: RunConfig, **kwargs: Any) -> tuple[Any, torch.nn.Module]:
        return load_for_training(cfg, **kwargs)

    def build_data(self, cfg: RunConfig, tok: Any, stats: dict[str, int]) -> tuple[list[Tokenized], list[Tokenized]]:
        return build_data(cfg, tok, stats)

    def prepare(self, *args: Any) -> None:
        """Nothing to compute before training."""

    def make_batch(self, items: list[Tokenized], pad_id: int, fast: Any) -> dict[str, Any]:
        return make_batch(items, pad_id, fast)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], fast: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return forward_loss(model, batch, fast)[0], {}

    def evaluate(self, model: torch.nn.Module, data: list[Tokenized], session: Session, batch_size: int,
                 pad_id: int, fast: Any, max_batches: int | None = None) -> dict[str, float]:
        val_loss = evaluate_loss(model, data, session, batch_size, pad_id, max_batches)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}


def make_objective(cfg: RunConfig, reference_logps: dict[str, tuple[float, float]] | None = None) -> Any:
    """The loop's objective hooks for `cfg.objective` (see the module docstring)."""
    if cfg.objective == "sft":
        return _Supervised()
    from fineray.train.preference import PreferenceObjective

    return PreferenceObjective(cfg, reference_logps)


def resume_state(session: Session, resume_from: str | None, strategy: Any, model: torch.nn.Module,
                 optimizer: Any, scheduler: Any, banner: str = "") -> tuple[LoopState, str | None]:
    """The loop state to start from, and the checkpoint it came from (the session's, else `resume_from`).

    Rank 0 prints `banner` (what the run is about to do), saying where it resumes."""
    ckpt = session.get_checkpoint() or resume_from
    state = strategy.load(ckpt, model, optimizer, scheduler) if ckpt else LoopState()
    if banner and session.rank == 0:
        print(f"[fineray] rank0: {banner}" + (f", resuming at step {state.step}" if ckpt else ""), flush=True)
    return state, ckpt


def static_metrics(trainable: int, total_params: int, world: int, total_steps: int,
                   data_stats: dict[str, int]) -> dict[str, Any]:
    """The metrics every report repeats (sizes, steps, data counts)."""
    return {"trainable_params": trainable, "total_params": total_params, "world_size": world,
            "total_steps": total_steps, **{f"data_{k}": v for k, v in data_stats.items()}}


def train_loop(cfg: RunConfig, session: Session, adapter_path: str | None = None,
               resume_from: str | None = None, reference_logps: dict[str, tuple[float, float]] | None = None
               ) -> LoopState:
    """Fine-tune per `cfg` on this worker; returns the final loop state.

    `resume_from` is a checkpoint folder to start from when the session has none of its own (Ray Train V2
    dropped `resume_from_checkpoint`; a caller passes the folder as `resume_from` in `train_loop_config`, as
    bench/gpu_strategies.py does; the launcher resumes through Ray Train's own run storage instead).
    `reference_logps`: precomputed reference log-probs of the preference pairs, by pair key (`reference.py`).
    """
    # ---------------------------------------------------------------- setup
    tcfg = cfg.train
    if tcfg.threads_per_worker:
        torch.set_num_threads(tcfg.threads_per_worker)
    torch.manual_seed(tcfg.seed)
    use_gpu = session.device.type == "cuda"
    objective = make_objective(cfg, reference_logps)
    tok, model = objective.load_model(cfg, use_gpu=use_gpu, adapter_path=adapter_path, device=session.device)
    trainable, total_params = count_parameters(model)
    # Fast path (packing, chunked loss, compile) and strategy (ddp/fsdp/deepspeed): see fastpath.py, strategies.py
    fast = resolve_fast(cfg, use_gpu, pick_dtype(cfg.model.dtype, use_gpu))
    model = apply_fast_path(model, fast)
    data_stats: dict[str, int] = {}
    train_data, val_data = objective.build_data(cfg, tok, data_stats)
    strategy = make_strategy(cfg.train, session, base_name=cfg.model.base)
    model, optimizer = strategy.prepare(model)
    # Reference log-probs need the starting weights: before a checkpoint is loaded.
    objective.prepare(unwrap(model), train_data + val_data, tok.pad_token_id, session.device, tcfg.batch_size)
    model.train()

    world = session.world_size
    steps_per_epoch = len(shard_batches(len(train_data), tcfg.batch_size, 0, world, tcfg.seed, 0)) // tcfg.grad_accum
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * max(steps_per_epoch, 1)))
    scheduler = make_scheduler(optimizer, tcfg.scheduler, int(tcfg.warmup_ratio * total_steps), total_steps)
    amp, scaler = mixed_precision(tcfg, use_gpu)
    eval_every = tcfg.eval_every
    ckpt_every = tcfg.checkpoint_every or eval_every

    state, _ = resume_state(session, resume_from, strategy, model, optimizer, scheduler,
                            f"{len(train_data)} train / {len(val_data)} val examples, {trainable:,} trainable of "
                            f"{total_params:,} params, {total_steps} steps, strategy={strategy.name}, "
                            f"{fast.describe()}")
    static = static_metrics(trainable, total_params, world, total_steps, data_stats)

    def write_ckpt(target: Path) -> None:
        final = state.step >= total_steps or bool(stop_reason)  # sharded strategies consolidate the weights
        strategy.save(target, model, optimizer, scheduler, state, final=final)

    # ---------------------------------------------------------------- loop
    stream = epoch_batches(train_data, tcfg.batch_size, session.rank, world, tcfg.seed,
                           state.epoch, state.batch_in_epoch, group_by_length=fast.group_by_length,
                           balance_ranks=fast.balance_ranks)
    pad_id = tok.pad_token_id
    if tcfg.eval_on_start and val_data and state.step == 0:  # where the run starts from (a step-0 row)
        state.history.append({"step": 0, **objective.evaluate(model, val_data, session, tcfg.batch_size, pad_id,
                                                               fast, tcfg.eval_batches)})
        if session.rank == 0:
            print("[fineray] before training: " + " ".join(f"{k}={v:.4g}" for k, v in state.history[-1].items()
                                                        if isinstance(v, float)), flush=True)
    t_window, tok_window = time.perf_counter(), 0
    stop_reason = None
    while state.step < total_steps and stop_reason is None:
        # Dropout masks depend only on (seed, rank, step): a resumed run draws the same ones.
        torch.manual_seed(tcfg.seed + 1_000_003 * session.rank + state.step)
        loss_sum = torch.zeros((), device=session.device)  # stays on the device: one sync per step, below
        extra_sum: dict[str, torch.Tensor] = {}  # the objective's metrics (preference: reward accuracy, margin...)
        for micro in range(tcfg.grad_accum):
            epoch, b_idx, items = next(stream)
            # A micro-batch may run as several chunks of whole documents (train.micro_batch_tokens): each
            # chunk's mean loss is weighted by its share of the micro-batch's targets, so the gradient is
            # the micro-batch's token-mean gradient, only computed in smaller activations.
            chunks = split_by_tokens(items, tcfg.micro_batch_tokens)
            batches = [objective.make_batch(chunk, pad_id, fast) for chunk in chunks]
            if len(batches) > 1:  # a chunk without targets would add 0 x NaN to the gradient
                batches = [b for b in batches if b["n_target"]] or batches[:1]
            n_micro = max(1, sum(b["n_target"] for b in batches))
            for c, host_batch in enumerate(batches):
                batch = to_device(host_batch, session.device)
                share = host_batch["n_target"] / n_micro if len(batches) > 1 else 1.0
                sync = micro == tcfg.grad_accum - 1 and c == len(batches) - 1
                with strategy.no_sync(model, sync), amp():
                    loss, extra = objective.loss(model, batch, fast)
                    scaled = loss * (share / tcfg.grad_accum)
                strategy.backward(scaled, scaler)
                loss_sum += loss.detach().float() * share
                for k, v in extra.items():
                    extra_sum[k] = extra_sum.get(k, 0.0) + v * share
                tok_window += host_batch["n_tokens"]
            state.epoch, state.batch_in_epoch = epoch, b_idx + 1
        train_loss = float(loss_sum) / tcfg.grad_accum
        if not math.isfinite(train_loss):
            stop_reason = "diverged"
            if session.rank == 0:
                print(f"[fineray] loss is {train_loss} at step {state.step + 1}: stopping. Lower train.lr, "
                      "enable train.grad_clip, or check the data for empty targets.", flush=True)
            break
        grad_norm = strategy.step(model, optimizer, scaler)  # clip, optimizer step, zero grads
        scheduler.step()
        state.step += 1

        row: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "train_loss": train_loss,
                               "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        if extra_sum:
            values = torch.stack([torch.as_tensor(v, device=session.device).float() for v in extra_sum.values()])
            row.update({f"train_{k}": v / tcfg.grad_accum for k, v in zip(extra_sum, values.tolist())})
        if state.step % tcfg.log_every == 0 or state.step == total_steps:
            now = time.perf_counter()
            tokens_all = session.all_reduce_sum([tok_window])[0]
            row["tokens_per_s"] = tokens_all / max(now - t_window, 1e-9)
            if use_gpu:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(session.device) / 2**30
            state.tokens_seen += int(tokens_all)
            t_window, tok_window = now, 0
        last = state.step == total_steps
        if val_data and (state.step % eval_every == 0 or last):
            row.update(objective.evaluate(model, val_data, session, tcfg.batch_size, pad_id, fast, tcfg.eval_batches))
            val_loss = row["val_loss"]
            if val_loss < state.best_val - 1e-4:
                state.best_val, state.bad_evals = val_loss, 0
            else:
                state.bad_evals += 1
            if tcfg.early_stopping_patience and state.bad_evals >= tcfg.early_stopping_patience:
                stop_reason = "early_stopping"
                row["early_stopped"] = True
        state.history.append(row)
        if session.rank == 0:
            session.progress({**row, "total_steps": total_steps})
        if session.rank == 0 and state.step % tcfg.log_every == 0:
            print("[fineray] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in row.items()), flush=True)
        if last or stop_reason or state.step % ckpt_every == 0 or "val_loss" in row:
            # Reports are barriers across workers (and cost ~1 s in Ray Train V2), so only at these points.
            strategy.report(session, {**static, **row, "done": bool(last or stop_reason),
                                      "stop_reason": stop_reason}, write_ckpt)
    # ---------------------------------------------------------------- cleanup
    if stop_reason == "diverged":
        session.report({**static, "step": state.step, "done": True, "stop_reason": "diverged"}, None)
    if use_gpu:
        torch.cuda.empty_cache()
    return state


def _quiet_ray_train_reports() -> None:
    # Ray Train V2 logs every report with its full metrics dict at INFO; our own step lines say it better.
    import logging

    try:
        import ray.train.v2._internal.execution.context as ctx

        logging.getLogger(ctx.__file__).setLevel(logging.WARNING)
        logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    except ImportError:  # internals moved: keep the default logging
        pass


def worker_config(config: dict[str, Any]) -> RunConfig:
    """In a Ray Train worker: the typed run config of `train_loop_config`, torch threads set to the worker's CPU
    share, Ray Train's per-report logging quietened."""
    cfg = RunConfig.model_validate(config["run"])
    if not cfg.train.threads_per_worker and not cfg.scaling.use_gpu:
        # Ray sets OMP_NUM_THREADS=1 per worker; honour a worker's CPU share instead.
        cpus = int((cfg.scaling.resources_per_worker or {}).get("CPU", 1))
        torch.set_num_threads(max(1, cpus))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_ray_train_reports()
    return cfg


def ray_worker_entry(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`: rebuild the typed config and run the loop."""
    cfg = worker_config(config)
    reference = config.get("reference_logps")
    if reference is not None and not isinstance(reference, dict):  # an ObjectRef from the launcher's pass
        import ray

        reference = ray.get(reference)
    train_loop(cfg, RaySession(config.get("progress_board")), adapter_path=config.get("adapter_path"),
               resume_from=config.get("resume_from"), reference_logps=reference)
