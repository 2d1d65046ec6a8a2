"""The typed `rl:` section of a run config (GRPO, `fineray rl`).

    rl:
      num_generations: 4          # G completions per prompt
      prompts_per_step: 8         # across all workers
      max_new_tokens: 64
      rewards:
        - {name: json_valid, weight: 0.5}
        - {name: field_match, weight: 1.0}
        - {function: my_rewards:brevity, weight: 0.2, timeout_s: 5}
        - {model: ticket-rm, weight: 1.0}         # a registered reward model (kind `reward`)

Prompts come from `data` (any supervised format: the last assistant turn is the reference answer the
verifiers compare with; or `{"prompt": ...}` records with extra columns). The rest of the run config
(model, method, lora, train, scaling, output) means what it means for `fineray train`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fineray.train.config import ConfigError, RunConfig, format_validation_error, repeated

__all__ = ["BUILTIN_REWARDS", "RewardSpec", "RlConfig", "RolloutConfig", "parse_rl_config"]

#: Built-in verifiers (see `rewards.py`).
BUILTIN_REWARDS = ("json_valid", "json_schema", "field_match", "exact_match", "regex", "length_penalty")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardSpec(_Section):
    """One reward function: exactly one of `name` (a built-in verifier), `function` (`module:function` or
    `path/to/file.py:function`) or `model` (a registry reward model, `name[@vN]`).

    Attributes:
        weight: weight in the summed reward (negative weights penalise).
        args: keyword arguments of the function (`json_schema`: `schema`; `regex`: `pattern`; `length_penalty`:
            `limit`, `window`, `unit`; `field_match` / `exact_match`: `reference_key`; any for a callable).
        timeout_s: a call that takes longer is cancelled and its completions score 0 (reported).
        label: name in the logs (default: the verifier, function or model name).
    """

    name: str | None = None
    function: str | None = None
    model: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(30.0, gt=0)
    label: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        given = [k for k in ("name", "function", "model") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of name (a built-in verifier), function (module:function) or model "
                             f"(a registered reward model); got {given or 'none'}")
        if self.name and self.name not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {self.name!r}; known: {', '.join(BUILTIN_REWARDS)}")
        if self.function and (":" not in self.function or not all(self.function.rsplit(":", 1))):
            raise ValueError(f"function {self.function!r} must look like module:function or path/file.py:function")
        if self.name == "json_schema" and not isinstance(self.args.get("schema"), (dict, str)):
            raise ValueError("json_schema needs args.schema (a JSON schema object, or a path to one)")
        if self.name == "regex" and not isinstance(self.args.get("pattern"), str):
            raise ValueError("regex needs args.pattern")
        if self.name == "length_penalty" and not isinstance(self.args.get("limit"), int):
            raise ValueError("length_penalty needs args.limit (an integer)")
        return self

    @property
    def key(self) -> str:
        """The label used in metrics (`reward_<key>_mean`)."""
        raw = self.label or self.name or self.model or (self.function or "").rsplit(":", 1)[-1]
        return "".join(c if c.isalnum() or c in "_-" else "_" for c in raw)


class RolloutConfig(_Section):
    """Who generates the completions.

    Attributes:
        backend: `engine`: Ray actors holding fineray's serving engine (continuous batching; only the adapter
            files travel to them each step); `policy`: every training worker generates with its own model
            (HF `generate`); `auto`: the engine when the adapter is servable (plain LoRA), else the policy.
        workers: rollout actors (engine backend).
        num_cpus / num_gpus: per actor. On CPU the default 0 time-shares the cores with the training
            workers, which wait for the rollouts anyway.
        threads: torch threads of an engine actor (default: the machine's cores on CPU).
        max_batch_size: sequences an engine decodes together.
    """

    backend: Literal["auto", "engine", "policy"] = "auto"
    workers: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(64, ge=1)


class RlConfig(_Section):
    """The `rl:` section (GRPO).

    Attributes:
        num_generations: completions per prompt (the group whose rewards are normalised together).
        prompts_per_step: prompts per optimizer step over all workers (a multiple of `scaling.num_workers`).
        max_new_tokens, temperature, top_p: sampling of the rollouts.
        beta: weight of the KL penalty to the reference policy (the same weights with the adapter disabled);
            0 skips the reference forward. With `model.adapter`, the reference is still the base model.
        epsilon / epsilon_high: the clipping range [1 - epsilon, 1 + epsilon_high] of the probability ratio
            (`epsilon_high` defaults to `epsilon`; DAPO's clip-higher raises it).
        iterations: optimizer updates per batch of rollouts (PPO's mu; the ratio is 1 at the first).
        loss: `token`: every completion token weighs the same (DAPO); `sequence`: mean per completion first
            (the original GRPO).
        scale_rewards: divide the group-centred rewards by the group's standard deviation (off: Dr. GRPO).
        mask_truncated: completions cut at `max_new_tokens` get no gradient.
        rewards: the reward functions, summed with their weights.
        reward_chunk: completions per reward task (each task has its function's timeout).
        reward_cpus: CPUs each reward task holds (0 time-shares; raise it for heavy user functions).
        eval_prompts: validation prompts scored with greedy decoding at every `train.eval_every` steps.
        rollout: who generates (see `RolloutConfig`).
    """

    num_generations: int = Field(4, ge=2)
    prompts_per_step: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)
    iterations: int = Field(1, ge=1)
    loss: Literal["token", "sequence"] = "token"
    scale_rewards: bool = True
    mask_truncated: bool = False
    rewards: list[RewardSpec] = Field(min_length=1)
    reward_chunk: int = Field(64, ge=1)
    reward_cpus: float = Field(0.0, ge=0)
    eval_prompts: int = Field(16, ge=0)
    rollout: RolloutConfig = RolloutConfig()

    @model_validator(mode="after")
    def _unique_labels(self) -> RlConfig:
        dup = repeated([r.key for r in self.rewards])
        if dup:
            raise ValueError(f"reward labels must be distinct (set `label`): {dup}")
        return self


def parse_rl_config(cfg: RunConfig) -> RlConfig:
    """The validated `rl:` section of a run config; errors name `rl.<key>`.

    Raises:
        ConfigError: no `rl:` section, a bad key or value, or a run config GRPO cannot run.
    """
    if not cfg.rl:
        raise ConfigError("this config has no `rl:` section (see configs/grpo.yaml)")
    try:
        rl = RlConfig.model_validate(cfg.rl)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "rl", "rl section", section="rl")) from None
    world = cfg.scaling.num_workers
    if rl.prompts_per_step % world:
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} must be a multiple of scaling.num_workers={world}")
    if cfg.objective != "sft":
        raise ConfigError(f"objective={cfg.objective} is for `fineray train`; GRPO's objective is set by `rl:`")
    if cfg.train.strategy != "ddp":
        raise ConfigError("fineray rl runs with train.strategy=ddp (rollouts and the reference need the whole "
                          "policy on every worker)")
    if rl.rollout.backend == "engine" and cfg.method not in ("lora", "qlora"):
        raise ConfigError(f"rl.rollout.backend=engine serves plain LoRA adapters; method={cfg.method} needs "
                          "backend policy (or auto)")
    return rl
