"""The typed ``federated:`` section of a run config.

``RunConfig.federated`` is a free-form dict owned by this component; :func:`federated_config` validates it
into a :class:`FederatedConfig` (pydantic, unknown keys rejected) and raises
:class:`~fineray.train.config.ConfigError` whose lines name ``federated.<key>``. Cross-field rules live
here too, each with the reason in its message:

* secure aggregation and DP need a *linear* strategy (the server only ever sees one weighted mean);
* per-silo LoRA ranks need a heterogeneous-rank strategy (FLoRA, FlexLoRA);
* ``min_silos`` cannot exceed the number of silos, and secure aggregation needs ``min_silos >= 2``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fineray.federated.secagg import SecAggConfig
from fineray.federated.strategies import STRATEGIES, AggregationStrategy, get_strategy
from fineray.train.config import ConfigError, RunConfig, ValidationSplit, format_validation_error, repeated

__all__ = [
    "DPSettings",
    "FederatedConfig",
    "SecAggSettings",
    "SiloSpec",
    "federated_config",
]

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiloSpec(_Section):
    """One data silo.

    Attributes:
        name: Unique silo name (letters, digits, ``._-``); also its TLS client-certificate CN.
        data: Training data of the silo (file or ``fineray:`` name). Required in simulation; the
            networked coordinator never reads it.
        validation: The silo's validation set: a file, or a fraction held out of ``data``.
        resources: Extra Ray resources the silo's actor needs, e.g. ``{"silo:acme": 1}`` pins it to
            nodes started with ``ray start --resources='{"silo:acme": 1}'``.
        num_cpus: CPUs reserved by the silo's actor (fractions allowed; torch uses ``ceil`` threads).
        num_gpus: GPUs reserved by the silo's actor.
        rank: This silo's LoRA rank (heterogeneous-rank strategies only; default ``lora.r``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    data: str | None = None
    validation: ValidationSplit = 0.1
    resources: dict[str, float] | None = None
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    rank: int | None = Field(None, ge=1)


class SecAggSettings(_Section):
    """Secure aggregation (:mod:`fineray.federated.secagg`) of the silos' update deltas, with dropout recovery.

    Attributes:
        enabled: Mask every update; the server learns only the weighted sum of the silos that finished.
        clip: Element-wise bound on an update delta (``|delta| <= clip``) before fixed-point encoding.
        frac_bits: Fixed-point fractional bits (quantisation step ``2^-frac_bits`` per element).
        modulus_bits: 32 or 64-bit modular arithmetic.
        max_weight: Upper bound on a silo's example count (it is masked too).
        threshold: Silos that must survive a round, ``t``: a count (``>= 2``), a fraction of the silos that
            sent keys in ``(0, 1]`` (rounded up), or null for a majority of them. Each silo Shamir-shares its
            mask key and self-mask seed ``t``-out-of-``n``; a silo that drops after sharing is recovered from
            the survivors' shares and the round completes without it (Bonawitz et al. 2017; SecAgg+, Bell et
            al. 2020). Fewer than ``t`` survivors and the round fails (the global adapter stays). Thresholds at
            or below half of the silos tolerate more dropouts but no longer stop a server that lies about who
            dropped from unmasking a live silo.
        mask_timeout_s: Time for each exchange after training (shares, masked vectors, revealed shares); a
            silo missing it is dropped and the round goes on with the others.
    """

    enabled: bool = False
    clip: float = Field(1.0, gt=0)
    frac_bits: int = Field(24, ge=8, le=40)
    modulus_bits: int = 64
    max_weight: float = Field(1e6, gt=0)
    threshold: int | float | None = None
    mask_timeout_s: float = Field(60.0, gt=0)

    @field_validator("modulus_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (32, 64):
            raise ValueError("must be 32 or 64")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | None) -> int | float | None:
        if isinstance(v, int) and v < 2:
            raise ValueError("a count of silos must be >= 2 (a 'sum' of one update reveals it)")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fraction of the silos must be in (0, 1]")
        return v

    def protocol_config(self, num_silos: int) -> SecAggConfig:
        """The fixed-point parameters every silo and the server use, for a federation of ``num_silos``."""
        return SecAggConfig(num_silos=num_silos, clip=self.clip, frac_bits=self.frac_bits,
                            modulus_bits=self.modulus_bits, max_weight=self.max_weight)


class DPSettings(_Section):
    """Silo-level differential privacy (DP-FedAvg: clip each delta to ``clip_norm``, Gaussian noise).

    Attributes:
        enabled: Turn DP on; epsilon at ``delta`` is reported after every round.
        clip_norm: ``C``, the L2 bound of one silo's update delta (all tensors jointly).
        noise_multiplier: ``z``; the noise std on the mean is ``z * C / m`` for ``m`` planned participants.
        delta: Target delta of the reported (epsilon, delta) guarantee.
    """

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class FederatedConfig(_Section):
    """Federated LoRA fine-tuning: silos, rounds, participation, aggregation, privacy, robustness.

    Attributes:
        silos: The silos (at least 2).
        rounds: Federated rounds.
        local_steps: Optimizer steps per silo per round (exclusive with ``local_epochs``).
        local_epochs: Local epochs per round instead of a step count.
        fraction_fit: Fraction of silos sampled per round (at least ``min_silos``).
        min_silos: Fewest accepted updates that make a round; fewer and the global adapter stays.
        round_timeout_s: Seconds a round waits for its participants; later updates are dropped.
        strategy: Aggregation strategy (see :data:`fineray.federated.strategies.STRATEGIES`).
        strategy_options: Options of the strategy: the ``options`` (server side) and ``client_options``
            (sent to the silos) its :class:`~fineray.federated.strategies.AggregationStrategy` entry declares.
        secure_aggregation: ``true``/``false`` or a :class:`SecAggSettings` mapping.
        dp: :class:`DPSettings`.
        max_update_norm: Reject an update whose delta L2 norm exceeds this (None: no bound).
        eval_data: Global held-out set evaluated every round (the coordinator's, public data).
        eval_max_examples: Cap on held-out and validation examples per evaluation.
        baselines: Simulation only: also train local-only and centralised models for the comparison.
        seed: Seed of participant sampling and of the initial adapter.
        threads_per_silo: torch threads per silo (default: ``ceil(num_cpus)``).
        final_eval_timeout_s: Networked mode: how long to wait for the silos' evaluations of the final
            adapter before finishing.
    """

    silos: list[SiloSpec] = Field(min_length=2)
    rounds: int = Field(3, ge=1)
    local_steps: int | None = Field(None, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_silos: int = Field(2, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    secure_aggregation: SecAggSettings = SecAggSettings()
    dp: DPSettings = DPSettings()
    max_update_norm: float | None = Field(None, gt=0)
    eval_data: str | None = None
    eval_max_examples: int = Field(200, ge=1)
    baselines: bool = True
    seed: int = 0
    threads_per_silo: int | None = Field(None, ge=1)
    final_eval_timeout_s: float = Field(120.0, gt=0)

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _secagg_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        try:
            return get_strategy(v).name
        except KeyError:
            raise ValueError(f"unknown strategy {v!r}; known: {sorted(STRATEGIES)}") from None

    @model_validator(mode="after")
    def _cross_checks(self) -> FederatedConfig:
        dupes = repeated([s.name for s in self.silos])
        if dupes:
            raise ValueError(f"silos: duplicate names {dupes}")
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("local_steps: local_steps and local_epochs are exclusive; set one")
        if self.local_steps is None and self.local_epochs is None:
            self.local_steps = 10
        if self.min_silos > len(self.silos):
            raise ValueError(f"min_silos: {self.min_silos} exceeds the {len(self.silos)} silos")
        strat = get_strategy(self.strategy)
        accepted = strat.options | set(strat.client_options)
        unknown = sorted(set(self.strategy_options) - accepted)
        if unknown:
            raise ValueError(f"strategy_options: {unknown} not accepted by {strat.name} "
                             f"(accepted: {sorted(accepted) or 'none'})")
        why = ("it needs every silo's individual LoRA factors (products, residual, stacking or SVD), but the "
               "server only ever sees one weighted mean")
        linear = sorted(n for n, s in STRATEGIES.items() if s.linear)
        if self.secure_aggregation.enabled:
            if not strat.linear:
                raise ValueError(f"secure_aggregation: strategy {strat.name!r} is not linear: {why} of the "
                                 f"masked updates. Use one of {linear}")
            if self.min_silos < 2:
                raise ValueError("secure_aggregation: min_silos must be >= 2 (a 'sum' of one update reveals it)")
            t = self.secure_aggregation.threshold
            if isinstance(t, int) and t > len(self.silos):
                raise ValueError(f"secure_aggregation: threshold {t} exceeds the {len(self.silos)} silos")
        if self.dp.enabled and not strat.linear:
            raise ValueError(f"dp: strategy {strat.name!r} is not linear: {why} of the clipped, noised deltas. "
                             f"Use one of {linear}")
        if any(s.rank is not None for s in self.silos) and not strat.heterogeneous_rank:
            raise ValueError(f"silos: per-silo 'rank' needs a heterogeneous-rank strategy "
                             f"({sorted(n for n, s in STRATEGIES.items() if s.heterogeneous_rank)}), "
                             f"not {strat.name!r}")
        return self

    @property
    def strategy_obj(self) -> AggregationStrategy:
        """The strategy's registry entry."""
        return get_strategy(self.strategy)

    def participants_per_round(self, available: int | None = None) -> int:
        """Planned participants: ``max(min_silos, ceil(fraction_fit * N))`` capped at ``N``."""
        n = len(self.silos) if available is None else available
        return min(n, max(self.min_silos, math.ceil(self.fraction_fit * n - 1e-9)))

    @property
    def trains_a(self) -> bool:
        """False when the strategy keeps ``A`` frozen at the shared initialisation (FFA-LoRA)."""
        return self.strategy_obj.trains_a

    @property
    def proximal_mu(self) -> float:
        """The client proximal coefficient ``mu`` (FedProx's ``client_options``; 0 without one)."""
        client = self.strategy_obj.client_options
        return float(self.strategy_options.get("mu", client["mu"])) if "mu" in client else 0.0

    def server_options(self) -> dict[str, Any]:
        """Keyword options passed to the strategy's ``aggregate`` (client-side ones removed)."""
        client = self.strategy_obj.client_options
        return {k: v for k, v in self.strategy_options.items() if k not in client}


def federated_config(cfg: RunConfig | dict[str, Any] | None) -> FederatedConfig:
    """Validates the ``federated`` section of a run config.

    Args:
        cfg: A :class:`RunConfig` (its ``federated`` dict is read) or the section itself.

    Returns:
        The typed section.

    Raises:
        ConfigError: Missing section or invalid keys; each line names ``federated.<key>``.
    """
    section = cfg.federated if isinstance(cfg, RunConfig) else cfg
    if not section:
        raise ConfigError("invalid config: the federated section is missing (federated.silos, federated.rounds, ...)")
    try:
        return FederatedConfig.model_validate(section)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "federated", section="federated")) from None
