"""Adaptive server optimisers for federated learning (FedAdam, FedYogi).

Reddi et al. 2021, "Adaptive Federated Optimization", arXiv 2003.00295, Algorithm 2.
The server treats the weighted average of the silo models as a step and feeds the
*pseudo-gradient* ``g = x_global - sum_i p_i x_i`` to Adam or Yogi (no bias correction, as in the
paper), applied element-wise to every adapter tensor (A and B factors separately, like FedAvg):

    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g^2                        (Adam)
    v  <- v - (1 - beta2) * g^2 * sign(v - g^2)                (Yogi)
    x  <- x - eta * m / (sqrt(v) + tau)

The sign convention differs from the paper's ``Delta = -g`` / ``x + eta * m / ...`` only in name.
Moments start at ``m = 0`` and ``v = tau^2`` (the paper requires ``v_{-1} >= tau^2``).

Pure: the optimiser state comes in as ``state`` and the new one is returned in
``AggregateResult.state``; nothing is mutated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fineray.federated._lora import acc_dtype, weighted_mean
from fineray.federated.strategies.base import AggregateResult, prepare
from fineray.federated.strategies.registry import AggregationStrategy, register

__all__ = ["OPTIONS", "FedOptState", "aggregate", "load_state", "register_variant", "save_state"]

#: The hyper-parameters a user may set in ``federated.strategy_options`` (FedAdam and FedYogi).
OPTIONS = frozenset({"eta", "beta1", "beta2", "tau"})


@dataclass(frozen=True)
class FedOptState:
    """Server optimiser moments (float32/64 tensors keyed like the adapter) and the step count."""

    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    step: int = 0


def save_state(state: FedOptState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The moments as ``m.<key>`` / ``v.<key>`` tensors and the step count as metadata (for checkpoints)."""
    tensors = {f"m.{k}": v for k, v in state.m.items()} | {f"v.{k}": v for k, v in state.v.items()}
    return tensors, {"step": state.step}


def load_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> FedOptState:
    """Inverse of :func:`save_state`."""
    return FedOptState(m={k[2:]: v for k, v in tensors.items() if k.startswith("m.")},
                       v={k[2:]: v for k, v in tensors.items() if k.startswith("v.")}, step=int(meta.get("step", 0)))


def aggregate(
    updates: list[dict[str, torch.Tensor]],
    weights: list[float],
    *,
    global_adapter: dict[str, torch.Tensor],
    state: FedOptState | None = None,
    optimizer: Literal["adam", "yogi"] = "adam",
    eta: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    **kw: Any,
) -> AggregateResult:
    """One FedAdam/FedYogi server step.

    Args:
        updates: Silo adapter state dicts after local training.
        weights: Example counts, normalised here.
        global_adapter: The round's starting global adapter ``x_t`` (same keys/shapes).
        state: Moments from the previous round; None on the first round.
        optimizer: ``"adam"`` or ``"yogi"``.
        eta: Server learning rate.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        tau: Adaptivity constant (also ``sqrt`` of the initial ``v``).
        **kw: Ignored.

    Returns:
        New global adapter (dtype of ``global_adapter``) and the new :class:`FedOptState`.

    Raises:
        ValueError: On mismatched keys/shapes, an unknown optimiser or bad hyper-parameters.
    """
    del kw
    if optimizer not in ("adam", "yogi"):
        raise ValueError(f"optimizer must be 'adam' or 'yogi', got {optimizer!r}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0 and eta > 0):
        raise ValueError(f"bad hyper-parameters eta={eta} beta1={beta1} beta2={beta2} tau={tau}")
    probs, _ = prepare(updates, weights, same_rank=True)
    if set(global_adapter) != set(updates[0]):
        raise ValueError("global_adapter keys differ from the updates'")

    new_adapter: dict[str, torch.Tensor] = {}
    new_m: dict[str, torch.Tensor] = {}
    new_v: dict[str, torch.Tensor] = {}
    for key, x in global_adapter.items():
        dtype = acc_dtype(x)
        avg = weighted_mean([u[key] for u in updates], probs).to(dtype)
        x_acc = x.to(dtype)
        g = x_acc - avg  # pseudo-gradient
        if state is None:
            m_prev = torch.zeros_like(x_acc)
            v_prev = torch.full_like(x_acc, tau**2)
        else:
            m_prev = state.m[key].to(device=x.device, dtype=dtype)
            v_prev = state.v[key].to(device=x.device, dtype=dtype)
        m = beta1 * m_prev + (1 - beta1) * g
        g2 = g * g
        if optimizer == "adam":
            v = beta2 * v_prev + (1 - beta2) * g2
        else:
            v = v_prev - (1 - beta2) * g2 * torch.sign(v_prev - g2)
        new_adapter[key] = (x_acc - eta * m / (v.sqrt() + tau)).to(x.dtype)
        new_m[key], new_v[key] = m, v
    step = 1 if state is None else state.step + 1
    return AggregateResult(adapter=new_adapter, state=FedOptState(m=new_m, v=new_v, step=step))


def register_variant(name: str, optimizer: Literal["adam", "yogi"]) -> AggregationStrategy:
    """Register `name` as this server optimisation with `optimizer` fixed (the FedAdam and FedYogi modules)."""

    def step(updates: list[dict[str, torch.Tensor]], weights: list[float], **kw: Any) -> AggregateResult:
        kw.pop("optimizer", None)
        return aggregate(updates, weights, optimizer=optimizer, **kw)

    step.__doc__ = f"{name} step; keyword arguments as :func:`fedopt.aggregate` (``global_adapter`` required)."
    return register(AggregationStrategy(name, step, linear=True, options=OPTIONS, save_state=save_state,
                                        load_state=load_state, paper="arXiv 2003.00295"))
