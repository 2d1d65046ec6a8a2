"""Pre-flight checks of a run config, before any GPU is allocated: known-bad combinations and a memory
estimate per GPU (`fineray plan CONFIG`).

Memory model (bytes per GPU; W = workers, T = tokens per micro-batch = batch_size x max_seq_len, the worst
case for both padded and packed batches; h, i, kv = hidden, MLP and key/value widths; L layers; V vocab):

  weights       params x 2 (bf16 on GPU; 4 for fp32), QLoRA linears x 0.516 (NF4 + double-quantised
                absmax) and its other params x 2 (fineray casts the frozen ones back to bf16 after PEFT's
                k-bit preparation); /W for the sharded parts under FSDP and ZeRO-3
  adapter       LoRA params x 16 (fp32 weight, grad, two AdamW moments; PEFT keeps adapters in fp32;
                10 with the 8-bit optimiser)
  full FT       DDP: +8 per param (bf16 grad, DDP bucket copy, two bf16 AdamW moments: the loop trains bf16
                weights in place); FSDP: (4 fp32 master + 4 grad + 8 AdamW)/W + two gathered bf16 blocks;
                ZeRO-2: 2 + (2 + 12)/W; ZeRO-3: (2 + 2 + 12)/W + gathered-parameter buffers;
                offloaded parts go to host memory
  activations   T x L x (18h + 6kv + 8i) bytes: the tensors autograd keeps per token and block for bf16
                Llama-style blocks with flash/SDPA attention (RMSNorm fp32 copies, q/k/v, rotary outputs,
                attention output, the four MLP tensors); x0.8 with regional compilation (fused norms and
                SwiGLU keep fewer copies); QLoRA's blocks keep bf16 tensors like LoRA's (its frozen norms
                stay bf16; with PEFT's fp32 upcast they measured x1.5 on an 8B shape);
                with `train.micro_batch_tokens`, T is the largest chunk: min(T, max(N, max_seq_len));
                LoRA dropout > 0 adds 3 x (6h + i) (dropped copies + masks);
                with activation checkpointing: T x L x 2h (block inputs) + one block's activations
  logits        plain loss: T x V x 14 (bf16 logits, fp32 copy, log-softmax, its gradient);
                chunked loss: chunk x V x 10 + T x h x 2
  dense mask    packed rows with the `sdpa` backend: T^2 bytes (boolean document mask)

The coefficients were fitted to HF Trainer measurements on an H200 (Llama-3.2-1B 2048x8: 54.6 GiB measured,
55.6 estimated; Llama-3-8B 2048x4: 80.4 measured, 76.8 estimated; 1B realistic batch 16, whose worst batch
is 16 x 2048 tokens: 111.7 measured, 108.8 estimated) and are checked against the fast path's
measured peaks in `bench/RESULTS_gpu.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fineray.train.config import RunConfig

__all__ = [
    "KNOWN_SHAPES",
    "Finding",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "check_rules",
    "estimate_memory",
    "format_plan",
    "model_shape",
    "plan_run",
]

GiB = 1024**3


@dataclass
class ModelShape:
    """The numbers the estimate needs from a model's config."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> ModelShape:
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   tied=bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block (Llama naming)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return self.layers * 2 * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_linear_params + self.embed_params + self.norm_params

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        mods = self.linears()
        names = list(mods) if targets == "all-linear" else [t for t in targets if t in mods]
        return self.layers * sum(r * (mods[n][0] + mods[n][1]) for n in names)


# Shapes of common hub models, so `fineray plan` works offline for them.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-1B": ModelShape(16, 2048, 8192, 128256, 32, 8, 64, tied=True),
    "meta-llama/Llama-3.2-3B": ModelShape(28, 3072, 8192, 128256, 24, 8, 128, tied=True),
    "meta-llama/Meta-Llama-3-8B": ModelShape(32, 4096, 14336, 128256, 32, 8, 128),
    "meta-llama/Llama-3.1-8B": ModelShape(32, 4096, 14336, 128256, 32, 8, 128),
    "meta-llama/Llama-3.1-70B": ModelShape(80, 8192, 28672, 128256, 64, 8, 128),
}


def model_shape(base: str) -> ModelShape | None:
    """Shape of `model.base` from its config.json (no weights are read); None when unknown offline."""
    for k, v in KNOWN_SHAPES.items():
        if base in (k, k + "-Instruct") or base.removesuffix("-Instruct") == k:
            return v
    try:
        from fineray.train.model import resolve_base

        path = Path(resolve_base(base))
    except Exception:  # noqa: BLE001 - a missing package or directory just means "shape unknown"
        return None
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        return ModelShape.from_config(json.loads(cfg_file.read_text()))
    try:
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(str(path)).to_dict())
    except Exception:  # noqa: BLE001 - a missing package or directory just means "shape unknown"
        return None


@dataclass
class Finding:
    """One pre-flight finding: `error` stops the run, `warning` and `info` are advice."""

    level: str
    key: str
    message: str
    fix: str = ""


@dataclass
class MemoryEstimate:
    """Estimated peak GPU memory of one worker, by component (bytes), and host memory for offloads."""

    parts: dict[str, float]
    tokens: int
    host_bytes: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB


@dataclass
class Plan:
    """Everything `fineray plan` prints."""

    findings: list[Finding]
    estimate: MemoryEstimate | None
    gpu_memory_gib: float
    fits: bool | None
    suggestions: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings) and self.fits is not False


def _fast_on(value: Any, gpu: bool) -> bool:
    return gpu if value == "auto" else bool(value)


def _deepspeed_file(path: str) -> list[Finding]:
    """The user's DeepSpeed JSON must exist and parse (else every worker fails after Ray started)."""
    f = Path(path).expanduser()
    try:
        json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        return [Finding("error", "train.deepspeed.config_file", f"cannot read {f}: {e.strerror or e}",
                        "give the path of a DeepSpeed JSON config (or leave it out)")]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        return [Finding("error", "train.deepspeed.config_file", f"{f}{where} is not a JSON file ({e})",
                        "fix the JSON")]
    return []


def check_rules(cfg: RunConfig) -> list[Finding]:
    """Known-bad and questionable combinations of settings that depend on the machine or are advice.

    Combinations that can never run (e.g. QLoRA with DeepSpeed) are refused when the config is loaded
    (`RunConfig._cross_checks`), so they are not repeated here."""
    t, gpu, out = cfg.train, cfg.scaling.use_gpu, []
    packing = _fast_on(cfg.data.packing, gpu)
    if cfg.method == "qlora" and not gpu:
        out.append(Finding("error", "method", "QLoRA needs a CUDA GPU (bitsandbytes has no CPU 4-bit backward)",
                           "set scaling.use_gpu=true or method=lora"))
    if cfg.method == "dora":
        out.append(Finding("warning", "method",
                           "DoRA adapters cannot be served in mixed-adapter batches (PEFT adapter_names)",
                           "serve a DoRA adapter alone or merged, or train method=lora for multi-adapter serving"))
    if packing:
        att = t.fast.packing_attention
        if att in ("varlen", "flex") and not gpu:
            out.append(Finding("error", "train.fast.packing_attention",
                               f"packing with `{att}` attention needs a CUDA GPU (no CPU backward)",
                               "use packing_attention=sdpa on CPU, or data.packing=false"))
        if cfg.model.trust_remote_code:
            out.append(Finding("error", "data.packing",
                               "packing without a position-aware attention: remote model code may ignore "
                               "per-document positions and masks, so packed examples would attend to each other",
                               "set data.packing=false for trust_remote_code models"))
        if att == "sdpa" and gpu:
            out.append(Finding("warning", "train.fast.packing_attention",
                               "sdpa packing builds a dense T x T mask (quadratic memory, no flash kernel)",
                               "use packing_attention=auto (varlen flash kernel)"))
    if t.precision == "fp16":
        if cfg.method == "qlora":
            out.append(Finding("error", "train.precision", "fp16 with QLoRA: the 4-bit compute path is bf16",
                               "use train.precision=bf16"))
        if t.strategy == "fsdp" and t.fsdp.mixed_precision:
            out.append(Finding("error", "train.precision", "fp16 with FSDP mixed precision: the policy is bf16 only",
                               "use train.precision=bf16"))
        if packing and gpu:
            out.append(Finding("warning", "train.precision", "fp16 with packing: the loss scaler is untested "
                               "with the varlen kernel", "use train.precision=bf16 (H100/H200 are bf16-native)"))
    if cfg.model.dtype == "float16" and t.precision in ("bf16", "auto") and gpu:
        out.append(Finding("warning", "model.dtype", "float16 weights with bf16 compute: two rounding steps",
                           "use model.dtype=bfloat16 or auto"))
    if t.optimizer == "paged_adamw_8bit":
        if not gpu:
            out.append(Finding("error", "train.optimizer", "paged 8-bit AdamW needs a CUDA GPU",
                               "use train.optimizer=adamw"))
        if t.strategy != "ddp":
            out.append(Finding("warning", "train.optimizer", "paged 8-bit AdamW is tested with DDP only",
                               "use train.optimizer=adamw with fsdp/deepspeed"))
    if t.strategy == "deepspeed" and t.deepspeed.config_file:
        out += _deepspeed_file(t.deepspeed.config_file)
    if t.strategy == "deepspeed" and (t.deepspeed.offload_optimizer or t.deepspeed.offload_params) and not gpu:
        out.append(Finding("warning", "train.deepspeed", "CPU offload on a CPU-only run changes nothing",
                           "turn offload off"))
    if t.strategy in ("fsdp", "deepspeed") and cfg.scaling.num_workers == 1:
        out.append(Finding("warning", "train.strategy", f"{t.strategy} with one worker shards nothing",
                           "use train.strategy=ddp, or more workers"))
    if t.strategy == "fsdp" and cfg.method == "qlora":
        out.append(Finding("info", "train.strategy", "FSDP with QLoRA keeps the 4-bit base replicated on every "
                           "GPU and shards the adapter and bf16 weights"))
    if gpu and not _fast_on(t.fast.compile, gpu) and not _fast_on(t.fast.chunked_loss, gpu) and not packing:
        out.append(Finding("info", "train.fast", "the GPU fast path is switched off (plain HF forward)"))
    return out


def estimate_memory(cfg: RunConfig, shape: ModelShape, tokens: int | None = None) -> MemoryEstimate:
    """Peak memory of one worker (see the module docstring for the model).

    Args:
        cfg: the run config.
        shape: the model's shape.
        tokens: tokens per micro-batch; default `train.batch_size x data.max_seq_len` (the worst case).
    """
    t, gpu = cfg.train, cfg.scaling.use_gpu
    w = max(1, cfg.scaling.num_workers)
    T = tokens if tokens is not None else t.batch_size * cfg.data.max_seq_len
    if t.micro_batch_tokens:  # chunks of whole documents: at most N tokens, or one document longer than N
        T = min(T, max(t.micro_batch_tokens, cfg.data.max_seq_len))
    wb = 2 if (gpu and cfg.model.dtype in ("auto", "bfloat16", "float16")) or cfg.model.dtype in (
        "bfloat16", "float16") else 4
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    strat, ds = t.strategy, t.deepspeed
    parts: dict[str, float] = {}
    host = 0.0
    shard_w = w if strat == "fsdp" or (strat == "deepspeed" and ds.stage == 3) else 1

    linear = shape.layers * shape.block_linear_params
    other = shape.embed_params + shape.norm_params
    if cfg.method == "qlora":
        # NF4 blocks of 64 + 8-bit absmax; embeddings/head/norms stay bf16 (model.apply_peft undoes PEFT's upcast)
        parts["weights (4-bit base)"] = linear * 0.516 + other * 2 / (w if strat == "fsdp" else 1)
    elif cfg.method == "full":
        n = shape.params
        if strat == "fsdp":
            parts["weights+grads+AdamW (sharded fp32)"] = n * 16 / w
            parts["gathered blocks (bf16)"] = 2 * 2 * (shape.block_linear_params + 2 * h)
        elif strat == "deepspeed":
            p_dev = 0 if ds.offload_params else (2 / w if ds.stage == 3 else 2)
            opt = 12 / w
            parts["weights (bf16)"] = n * p_dev
            parts["grads (bf16)"] = n * 2 / w + 2 * 50_000_000 * 2  # partitions + reduce buckets
            if ds.offload_optimizer:
                host += n * opt
            else:
                parts["fp32 master+AdamW"] = n * opt
            if ds.offload_params:
                host += n * 2 / w
            if ds.stage == 3:
                parts["gathered params"] = 2 * 2 * (shape.block_linear_params + 2 * h)
        else:
            parts["weights"] = n * wb
            parts["grads+DDP buckets+AdamW"] = n * (wb * 2 + 2 * wb) if wb == 2 else n * 16
    else:
        parts["weights"] = shape.params * wb / shard_w
    if cfg.method in ("lora", "dora", "qlora"):
        n_lora = shape.lora_params(cfg.lora.r, cfg.lora.target_modules)
        per = 10 if t.optimizer == "paged_adamw_8bit" else 16
        parts["adapter+grads+AdamW"] = n_lora * per / (w if strat in ("fsdp", "deepspeed") else 1)
        if cfg.method == "dora":
            parts["adapter+grads+AdamW"] *= 1.05  # magnitude vectors

    compile_on = _fast_on(t.fast.compile, gpu)
    ckpt = t.grad_checkpointing or (strat == "fsdp" and t.fsdp.activation_checkpointing)
    per_block = (18 * h + 6 * kv + 8 * i) * (wb / 2)
    if compile_on:
        per_block *= 0.8
    if cfg.lora.dropout > 0 and cfg.method != "full":
        per_block += 3 * (6 * h + i)
    if ckpt:
        parts["activations (checkpointed)"] = T * shape.layers * 2 * h + T * per_block
    else:
        parts["activations"] = T * shape.layers * per_block
    chunked = _fast_on(t.fast.chunked_loss, gpu and strat != "deepspeed")
    if chunked:
        from fineray.train.fused_loss import default_chunk_tokens

        chunk = min(T, t.fast.loss_chunk_tokens or default_chunk_tokens(shape.vocab))
        parts["logits (chunked)"] = chunk * shape.vocab * 10 + T * h * 2
    else:
        parts["logits"] = T * shape.vocab * 14 * (1 if wb == 2 else 1.5)
    packing = _fast_on(cfg.data.packing, gpu)
    att = t.fast.packing_attention
    if packing and (att == "sdpa" or (att == "auto" and not gpu)):
        parts["dense document mask"] = float(T) * T
    return MemoryEstimate(parts=parts, tokens=T, host_bytes=host)


def _suggestions(cfg: RunConfig, est: MemoryEstimate, limit: float) -> list[str]:
    t, tips = cfg.train, []
    share = {k: v / max(est.total, 1.0) for k, v in est.parts.items()}
    for k in sorted(share, key=share.get, reverse=True):
        if k == "logits" and share[k] > 0.1:
            tips.append(f"train.fast.chunked_loss=true (the full logits are {share[k]:.0%} of the total)")
        if k == "activations" and share[k] > 0.3 and not t.grad_checkpointing:
            tips.append(f"train.grad_checkpointing=true (activations are {share[k]:.0%} of the total)")
            if cfg.lora.dropout > 0 and cfg.method != "full":
                tips.append("lora.dropout=0 (each LoRA layer keeps a dropped copy of its input and a mask: "
                            "about +60% activation memory on Llama shapes)")
        if k == "dense document mask" and share[k] > 0.05:
            tips.append("train.fast.packing_attention=auto (no dense mask with the varlen kernel)")
    if est.total > limit:
        if cfg.method in ("lora", "dora"):
            tips.append("method=qlora (4-bit base weights)")
        if cfg.method == "full" and t.strategy == "ddp":
            tips.append("train.strategy=fsdp or deepspeed (ZeRO-3) to shard weights and optimizer state")
        if t.strategy == "deepspeed" and not t.deepspeed.offload_optimizer:
            tips.append("train.deepspeed.offload_optimizer=true")
        tips.append(f"train.batch_size={max(1, t.batch_size // 2)} with train.grad_accum={t.grad_accum * 2} "
                    "(same effective batch)")
    return tips


def plan_run(cfg: RunConfig, gpu_memory_gib: float | None = None, tokens: int | None = None) -> Plan:
    """Rules + memory estimate for a run config.

    Args:
        cfg: the run config.
        gpu_memory_gib: memory per GPU to check against (default 80 GiB; H200: ~139).
        tokens: tokens per micro-batch for the estimate (default the worst case, batch_size x max_seq_len).
    """
    limit = float(gpu_memory_gib or 80.0)
    findings = check_rules(cfg)
    shape = model_shape(cfg.model.base)
    summary: dict[str, Any] = {"model": cfg.model.base, "method": cfg.method, "strategy": cfg.train.strategy,
                               "workers": cfg.scaling.num_workers, "gpu": cfg.scaling.use_gpu}
    if shape is None:
        findings.append(Finding("warning", "model.base", "model shape unknown offline: no memory estimate"))
        return Plan(findings, None, limit, None, summary=summary)
    est = estimate_memory(cfg, shape, tokens)
    summary.update({"params": shape.params, "tokens_per_micro_batch": est.tokens})
    fits = est.total <= limit * GiB * 0.95 if cfg.scaling.use_gpu else None  # 5% for allocator slack
    tips = _suggestions(cfg, est, limit * GiB) if fits is False or cfg.scaling.use_gpu else []
    if fits is False:
        findings.append(Finding("error", "memory", f"estimated {est.total_gib:.1f} GiB per GPU does not fit "
                                f"{limit:.0f} GiB", "; ".join(tips[:2])))
    return Plan(findings, est, limit, fits, suggestions=tips, summary=summary)


def format_plan(plan: Plan) -> str:
    """Human-readable plan (plain text; no markup)."""
    s = plan.summary
    lines = [(f"plan: {s.get('model')} method={s.get('method')} strategy={s.get('strategy')} "
             f"workers={s.get('workers')} gpu={s.get('gpu')}")]
    if "params" in s:
        size = f"{s['params'] / 1e9:.2f} B" if s["params"] >= 1e8 else f"{s['params'] / 1e6:.2f} M"
        lines.append(f"  model: {size} params; {s['tokens_per_micro_batch']:,} tokens per "
                     "micro-batch per worker (batch_size x max_seq_len)")
    if plan.estimate is not None:
        lines.append("memory per GPU (estimate, peak allocated):")
        for k, v in plan.estimate.parts.items():
            lines.append(f"  {k:<38} {v / GiB:8.2f} GiB")
        lines.append(f"  {'total':<38} {plan.estimate.total_gib:8.2f} GiB of {plan.gpu_memory_gib:.0f} GiB")
        if plan.estimate.host_bytes:
            lines.append(f"  host memory for offloaded state: {plan.estimate.host_bytes / GiB:.1f} GiB per worker")
        verdict = {True: "fits", False: "DOES NOT FIT", None: "CPU run (no GPU memory check)"}[plan.fits]
        lines.append(f"  verdict: {verdict}")
    if plan.suggestions:
        lines.append("suggestions:")
        lines += [f"  - {t}" for t in plan.suggestions]
    if plan.findings:
        lines.append("checks:")
        for f in plan.findings:
            lines.append(f"  {f.level.upper():<7} {f.key}: {f.message}" + (f" -> fix: {f.fix}" if f.fix else ""))
    else:
        lines.append("checks: no known-bad combination")
    lines.append("result: " + ("OK" if plan.ok else "BLOCKED (fix the errors above)"))
    return "\n".join(lines)
