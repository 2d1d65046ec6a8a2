"""The sections of the run config (`model:`, `data:`, `train:`, ...): typed pydantic models, unknown keys refused.

`fineray.train.config` puts them together as `RunConfig` and loads it; import them from there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "EMBEDDED_MODEL",
    "OBJECTIVES",
    "ClusterConfig",
    "DataConfig",
    "DatasetSpec",
    "DeepSpeedConfig",
    "EvalConfig",
    "FastConfig",
    "FsdpConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PreferenceConfig",
    "ScalingConfig",
    "Section",
    "TrainConfig",
    "ValidationSplit",
    "repeated",
]

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
#: Training objectives: supervised (`sft`), the DPO family on preference pairs, and a Bradley-Terry reward model.
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "reward")
_FORMATS = Literal["auto", "alpaca", "chat", "sharegpt", "completion", "text", "preference", "prompt"]


def _fraction_in_range(v: str | float | None) -> str | float | None:
    if isinstance(v, float) and not 0 < v < 1:
        raise ValueError("a validation fraction must be in (0, 1)")
    return v


def repeated(values: list[Any]) -> list[Any]:
    """The values that occur more than once, sorted (for "duplicate names" errors)."""
    return sorted({v for v in values if values.count(v) > 1})


#: A validation set: a file, or the fraction in (0, 1) held out of the training data (None: none).
ValidationSplit = Annotated[str | float | None, AfterValidator(_fraction_in_range)]


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which base model to fine-tune.

    Attributes:
        base: `embedded:smollm2-135m-instruct` (shipped in a PyPI package, works offline), `tiny:llama`
            (random-init 2-layer model for tests), a local directory, or a hub id.
        adapter: continue training from this adapter: a registry name (`name` or `name@version`) or a path.
        dtype: weight dtype; `auto` is bf16 on GPU and fp32 on CPU.
        trust_remote_code: passed to transformers for hub models that need it.
        attn_implementation: transformers attention backend (`sdpa`, `eager`, `flex_attention`, ...).
    """

    base: str = EMBEDDED_MODEL
    adapter: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


class LoraConfig(Section):
    """LoRA / DoRA / QLoRA adapter shape (ignored for `method: full`)."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    init_seed: int | None = None


class DatasetSpec(Section):
    """One source in a multi-task mix."""

    path: str
    weight: float = Field(1.0, gt=0)
    task_prefix: str | None = None
    format: _FORMATS | None = None


class DataConfig(Section):
    """Training data: files or `datasets` names, format, lengths and packing.

    Attributes:
        train: a path / dataset name, or a list of `{path, weight, task_prefix}` mixed by weight.
        validation: a path, or a fraction in (0, 1) held out from `train`.
        format: record format; `auto` detects it from the keys of the first record.
        max_seq_len: longer examples are dropped (counted and reported), not truncated mid-answer.
        train_on_prompt: compute the loss on prompt tokens too (default: response tokens only).
        on_error: what to do with a malformed record: `fail` (default) or `skip` (counted).
        max_examples: cap on training examples after filtering (handy for smoke runs).
        packing: concatenate each micro-batch's examples into one row with per-document positions and a
            document-masked attention (no padding, no cross-attention between examples); `auto` packs on GPU.
    """

    train: str | list[DatasetSpec] = "fineray:support-tickets"
    validation: ValidationSplit = 0.1
    format: _FORMATS = "auto"
    max_seq_len: int = Field(512, ge=8)
    packing: bool | Literal["auto"] = "auto"
    train_on_prompt: bool = False
    on_error: Literal["fail", "skip"] = "fail"
    max_examples: int | None = Field(None, ge=1)
    system_prompt: str | None = None

    def sources(self) -> list[DatasetSpec]:
        """The training sources as a list, a single path being a one-item mix."""
        if isinstance(self.train, str):
            return [DatasetSpec(path=self.train)]
        return list(self.train)


class FastConfig(Section):
    """GPU fast-path switches (`fineray.train.fastpath`). `auto` is on when training on a CUDA GPU, off on CPU.

    Attributes:
        packing_attention: document-masked attention for packed rows: `varlen` (flash varlen kernel, CUDA),
            `flex` (FlexAttention block mask), `sdpa` (dense block-diagonal mask; any device), `auto`.
        chunked_loss: cross-entropy computed in token chunks straight from the hidden states, never
            materialising the full logits over the vocabulary.
        loss_chunk_tokens: tokens per loss chunk (default: ~1 GiB of fp32 logits per chunk).
        compile: `torch.compile` each decoder layer (regional compilation; attention stays eager).
        group_by_length: batch examples of similar length together (less padding when not packing).
        expandable_segments: let the CUDA caching allocator grow segments in place, so steps whose packed
            length changes every time do not fragment memory or call cudaMalloc (GPU only).
        compile_attention: keep the varlen attention inside each layer's compiled graph (one graph per layer
            instead of three; the lengths become symbolic). Off: attention runs eager between two graphs.
            `auto`: on with `compile` and the varlen kernel (8B shape, short steps: 4.0x vs 3.15x HF).
        balance_ranks: with several workers, deal each step's documents to the ranks by tokens (longest
            first to the lightest rank) so no rank waits for a heavier one at the gradient all-reduce.
            `auto`: on when packing.
    """

    packing_attention: Literal["auto", "varlen", "flex", "sdpa"] = "auto"
    chunked_loss: bool | Literal["auto"] = "auto"
    loss_chunk_tokens: int | None = Field(None, ge=16)
    compile: bool | Literal["auto"] = "auto"
    group_by_length: bool = False
    expandable_segments: bool | Literal["auto"] = "auto"
    compile_attention: bool | Literal["auto"] = "auto"
    balance_ranks: bool | Literal["auto"] = "auto"


class FsdpConfig(Section):
    """PyTorch FSDP2 (`fully_shard`) settings for `train.strategy: fsdp` (full shard, one group per block)."""

    reshard_after_forward: bool = True
    activation_checkpointing: bool = True
    mixed_precision: bool = Field(True, description="bf16 compute/params, fp32 gradient reduction (GPU)")
    cpu_offload: bool = False


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO settings for `train.strategy: deepspeed`; the JSON config is generated from the run
    config, and `config_file` (a user JSON) is merged on top of it."""

    stage: Literal[2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: str | None = None

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3 (ZeRO-2 does not partition parameters)")
        return self


class TrainConfig(Section):
    """Optimisation and loop settings. Steps count optimizer updates (after gradient accumulation)."""

    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, description="sequences per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    micro_batch_tokens: int | None = Field(
        None, ge=16, description="split every micro-batch into chunks of whole documents with at most this "
        "many tokens and accumulate their gradients: the same tokens per optimizer step in less activation memory")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    eval_every: int = Field(50, ge=1)
    eval_on_start: bool = Field(False, description="evaluate once before the first step (row `step: 0`)")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation batches per eval")
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = 42
    log_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="default: at every eval")
    max_failures: int = Field(1, ge=-1, description="worker-failure retries from the last checkpoint")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    threads_per_worker: int | None = Field(None, ge=1)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="paged_adamw_8bit: bitsandbytes paged 8-bit AdamW (GPU; handy with QLoRA)")
    fast: FastConfig = FastConfig()
    fsdp: FsdpConfig = FsdpConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @model_validator(mode="after")
    def _micro_batch_tokens_not_deepspeed(self) -> TrainConfig:
        if self.micro_batch_tokens and self.strategy == "deepspeed":
            # DeepSpeed counts micro-steps itself (gradient_accumulation_steps): a variable number of chunks
            # per micro-batch would move its optimizer-step boundary.
            raise ValueError("micro_batch_tokens is not supported with strategy=deepspeed; use grad_accum")
        return self


class ScalingConfig(Section):
    """How many Ray Train workers and what each gets."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class OutputConfig(Section):
    """Where results go: a run directory and the adapter registry (local paths or storage URIs)."""

    dir: str = "runs"
    registry: str = "adapters"
    name: str | None = None
    register_adapter: bool = True


class ClusterConfig(Section):
    """Ray connection: empty address starts a private local Ray for this run."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class EvalConfig(Section):
    """Held-out evaluation run after training (base vs tuned)."""

    enabled: bool = True
    data: str | None = None
    max_examples: int = Field(64, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    general_text: str | None = "fineray:general-text"
    metrics: list[str] = ["exact_match", "rouge_l", "bleu", "json_valid", "field_accuracy"]


class PreferenceConfig(Section):
    """The `dpo:` section: settings of the preference objectives (`objective: dpo | ipo | orpo | simpo | reward`).

    Attributes:
        beta: strength of the implicit KL constraint (DPO, IPO), the odds-ratio weight (ORPO) or the reward
            scale (SimPO). Default: 0.1, and 2.0 for SimPO.
        label_smoothing: assumed share of flipped labels (conservative DPO / SimPO), in [0, 0.5).
        simpo_gamma: SimPO's target reward margin.
        reward_margin: Bradley-Terry margin for `objective: reward` (the chosen score must win by this much).
        rpo_alpha: weight of an added negative log-likelihood of the chosen response (per token; RPO, Pang et
            al. 2024) for dpo and ipo: keeps the chosen responses likely while the margin grows (0: off).
        reference: where the reference log-probs come from (DPO, IPO). `adapter_disabled`: the same weights
            with the adapter disabled (LoRA/DoRA/QLoRA; no second copy): the base model. `precomputed`: one Ray
            Data pass over the pairs before training with the starting policy (base plus `model.adapter`), so
            when continuing a supervised adapter the reference is that SFT model. `auto`: adapter_disabled for
            a fresh adapter, precomputed when continuing `model.adapter` or for `method: full`.
        max_prompt_len: prompts longer than this many tokens keep their last tokens (counted as truncated);
            pairs still longer than `data.max_seq_len` are dropped and counted.
    """

    beta: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0)
    reward_margin: float = Field(0.0, ge=0)
    rpo_alpha: float = Field(0.0, ge=0)
    reference: Literal["auto", "adapter_disabled", "precomputed"] = "auto"
    max_prompt_len: int | None = Field(None, ge=1)

    def beta_for(self, objective: str) -> float:
        """`beta`, or the objective's default."""
        return self.beta if self.beta is not None else (2.0 if objective == "simpo" else 0.1)
