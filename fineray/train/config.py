"""The typed run config: one tree of pydantic models, YAML on disk, `key=value` overrides on top.

Every section forbids unknown keys, so a typo (`train.lrr`) is an error that names the key instead of a
silently ignored setting. Validation errors are re-raised as `ConfigError` with dotted key paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "EMBEDDED_MODEL",
    "NAME_PREFIXES",
    "OBJECTIVES",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DatasetSpec",
    "DeepSpeedConfig",
    "FastConfig",
    "FsdpConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PreferenceConfig",
    "RunConfig",
    "ScalingConfig",
    "TrainConfig",
    "ValidationSplit",
    "apply_overrides",
    "config_hash",
    "file_fields",
    "format_validation_error",
    "is_uri_or_name",
    "load_config",
    "load_yaml",
    "repeated",
    "section_for",
    "validate_config",
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


class ConfigError(ValueError):
    """A run config that cannot be loaded; the message names the file, key or line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
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


class LoraConfig(_Section):
    """LoRA / DoRA / QLoRA adapter shape (ignored for `method: full`)."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    init_seed: int | None = None


class DatasetSpec(_Section):
    """One source in a multi-task mix."""

    path: str
    weight: float = Field(1.0, gt=0)
    task_prefix: str | None = None
    format: _FORMATS | None = None


class DataConfig(_Section):
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


class FastConfig(_Section):
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


class FsdpConfig(_Section):
    """PyTorch FSDP2 (`fully_shard`) settings for `train.strategy: fsdp` (full shard, one group per block)."""

    reshard_after_forward: bool = True
    activation_checkpointing: bool = True
    mixed_precision: bool = Field(True, description="bf16 compute/params, fp32 gradient reduction (GPU)")
    cpu_offload: bool = False


class DeepSpeedConfig(_Section):
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


class TrainConfig(_Section):
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


class ScalingConfig(_Section):
    """How many Ray Train workers and what each gets."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class OutputConfig(_Section):
    """Where results go: a run directory and the adapter registry (local paths or storage URIs)."""

    dir: str = "runs"
    registry: str = "adapters"
    name: str | None = None
    register_adapter: bool = True


class ClusterConfig(_Section):
    """Ray connection: empty address starts a private local Ray for this run."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class EvalConfig(_Section):
    """Held-out evaluation run after training (base vs tuned)."""

    enabled: bool = True
    data: str | None = None
    max_examples: int = Field(64, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    general_text: str | None = "fineray:general-text"
    metrics: list[str] = ["exact_match", "rouge_l", "bleu", "json_valid", "field_accuracy"]


class PreferenceConfig(_Section):
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


class RunConfig(_Section):
    """A whole fine-tuning run. Sections are typed; extra top-level sections are owned by components
    (`tune`, `federated`) and validated by them."""

    model: ModelConfig = ModelConfig()
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo", "reward"] = "sft"
    dpo: PreferenceConfig = PreferenceConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    output: OutputConfig = OutputConfig()
    cluster: ClusterConfig = ClusterConfig()
    eval: EvalConfig = EvalConfig()
    tune: dict[str, Any] | None = None
    federated: dict[str, Any] | None = None
    rl: dict[str, Any] | None = None  # GRPO (`fineray rl`), validated by fineray.rl

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.method == "qlora" and self.train.strategy == "deepspeed":
            # bitsandbytes 4-bit params cannot be partitioned by ZeRO-3; ZeRO-2 would need dtype juggling.
            raise ValueError("method=qlora cannot run with train.strategy=deepspeed; use ddp or fsdp")
        if self.dpo.reference == "adapter_disabled" and self.method == "full":
            raise ValueError("dpo.reference=adapter_disabled needs an adapter method (lora, dora, qlora); a full "
                             "fine-tune precomputes its reference (dpo.reference: auto)")
        if self.objective != "sft" and self.data.format not in ("auto", "preference"):
            raise ValueError(f"objective={self.objective} trains on preference pairs: data.format must be auto or "
                             f"preference (got {self.data.format})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML-safe, default values included)."""
        return self.model_dump(mode="json")


def format_validation_error(err: ValidationError, source: str, what: str = "config") -> str:
    """One line per problem, each naming its dotted key (`train.lrr: unknown key`)."""
    lines = [f"invalid {what} ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}" + ("" if e["type"] == "extra_forbidden" else f" (got {e['input']!r})"))
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file and line of a syntax error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"broken YAML at {where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_value(raw: str) -> Any:
    # YAML scalars give the natural types: 1e-4 -> float, true -> bool, [q_proj,v_proj] -> list.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a plain config dict (returns a new dict)."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        node, last = section_for(out, key.strip(), item)
        node[last] = _parse_value(raw)
    return out


def section_for(data: dict[str, Any], dotted_key: str, item: str) -> tuple[dict[str, Any], str]:
    """The (created if missing) section dict that holds `a.b.c` and the last key `c`; errors name `item`."""
    parts = dotted_key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = nxt
    return node, parts[-1]


def validate_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict as a RunConfig, raising ConfigError with dotted key paths."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) plus `key=value` overrides.

    Relative paths of local files (`file_fields`) in the file are resolved against the file's folder, so a
    config runs from any cwd; those given as overrides (or found only from the cwd) against the cwd. Either
    way they become absolute, as Ray workers run in other folders.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = load_yaml(path)
        source = str(path)
        _resolve_relative_paths(data, Path(path).resolve().parent)
    data = apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, Path.cwd())
    return validate_config(data, source)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> None:
    for container, key, _ in file_fields(data):
        p = container[key]
        if not Path(p).expanduser().is_absolute() and (base / p).exists():
            container[key] = str((base / p).resolve())


#: Prefixes of values that name a built-in or hub dataset or model rather than a local file.
NAME_PREFIXES = ("fineray:", "embedded:", "tiny:", "hf:", "dataset:")


def is_uri_or_name(value: str) -> bool:
    """A storage URI (`s3://...`) or a built-in / hub / registry name (`fineray:`, `hf:`, `dataset:`, ...)."""
    return "://" in value or value.startswith(NAME_PREFIXES)


def _section(node: Any, key: str) -> dict[str, Any]:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def file_fields(data: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """Every field of a plain run config that names a local input file, as (container, key, dotted label).

    The fields: `data.train` (or each `data.train[i].path`), `data.validation`, `eval.data`,
    `eval.general_text`, `train.deepspeed.config_file` and `federated.silos[i].data` / `.validation`, where they hold a path
    (not a URI, a built-in or hub name, or a number). Loading resolves them against the config file's folder;
    job submission ships them. Assigning `container[key]` rewrites the config.
    """
    d = _section(data, "data")
    slots: list[tuple[dict[str, Any], str, str]] = []
    if isinstance(d.get("train"), list):
        slots += [(spec, "path", f"data.train[{i}].path") for i, spec in enumerate(d["train"]) if isinstance(spec, dict)]
    else:
        slots.append((d, "train", "data.train"))
    slots.append((d, "validation", "data.validation"))
    ev = _section(data, "eval")
    slots += [(ev, "data", "eval.data"), (ev, "general_text", "eval.general_text")]
    slots.append((_section(_section(data, "train"), "deepspeed"), "config_file", "train.deepspeed.config_file"))
    silos = _section(data, "federated").get("silos")
    if isinstance(silos, list):
        slots += [(s, key, f"federated.silos[{i}].{key}") for i, s in enumerate(silos) if isinstance(s, dict)
                  for key in ("data", "validation")]
    return [(c, k, label) for c, k, label in slots
            if isinstance(c.get(k), str) and c[k] and not is_uri_or_name(c[k])]


def config_hash(cfg: RunConfig) -> str:
    """Short stable hash of a config (for job metadata and run names)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
