"""Aggregation strategies: exactness against brute-force dense sums, optimiser steps, registry."""

from __future__ import annotations

import pytest
import torch

from fineray.federated._lora import flatten, lora_pairs, normalise_weights, unflatten, weighted_mean
from fineray.federated.config import federated_config
from fineray.federated.state import FederationSnapshot, load_snapshot, save_snapshot
from fineray.federated.strategies import (
    STRATEGIES,
    AggregateResult,
    AggregationStrategy,
    fedavg,
    fedex_lora,
    fedopt,
    fedprox,
    ffa_lora,
    flexlora,
    flora,
    get_strategy,
)
from fineray.federated.strategies.registry import register
from fineray.train.config import ConfigError

PREFIXES = (  # the modules built by the ``make_adapter`` fixture (conftest.py)
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.0.self_attn.v_proj",
)
A_KEY = "m.lora_A.weight"
B_KEY = "m.lora_B.weight"
WEIGHTS = [120.0, 45.0, 300.0]


def _scalar(b: float, a: float) -> dict[str, torch.Tensor]:
    return {A_KEY: torch.tensor([[a]], dtype=torch.float64), B_KEY: torch.tensor([[b]], dtype=torch.float64)}


def _product(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return state[f"{prefix}.lora_B.weight"] @ state[f"{prefix}.lora_A.weight"]


def _delta_product(result, prefix: str) -> torch.Tensor:
    b_res, a_res = result.base_delta[prefix]
    return b_res @ a_res


def test_lora_pairs_groups_a_and_b_per_module(make_adapter):
    # Prepare
    state = make_adapter() | {"base_model.model.score.modules_to_save.default.weight": torch.zeros(2)}
    state["x.lora_A.default.weight"] = torch.zeros(2, 3)
    state["x.lora_B.default.weight"] = torch.zeros(3, 2)
    # Execute
    pairs = lora_pairs(state)
    # Assert
    assert set(pairs) == set(PREFIXES) | {"x"}
    assert pairs["x"] == ("x.lora_A.default.weight", "x.lora_B.default.weight")
    with pytest.raises(ValueError, match="missing their A or B"):
        lora_pairs({A_KEY: torch.zeros(1, 1)})


def test_flatten_unflatten_roundtrip(make_adapter):
    # Prepare
    state = make_adapter(dtype=torch.float32)
    # Execute
    vec, spec = flatten(state)
    back = unflatten(vec, spec)
    # Assert
    assert vec.dtype == torch.float64 and vec.numel() == spec.numel == sum(t.numel() for t in state.values())
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_scalar_counterexample_fedavg_is_inexact_fedex_is_exact():
    # Prepare: every local product is 0 (2*0 and 0*2).
    updates = [_scalar(b=2.0, a=0.0), _scalar(b=0.0, a=2.0)]
    # Execute
    naive = get_strategy("fedavg").aggregate(updates, [1.0, 1.0])
    exact = fedex_lora.aggregate(updates, [1.0, 1.0])
    # Assert
    assert (naive.adapter[B_KEY] @ naive.adapter[A_KEY]).item() == pytest.approx(1.0)
    fedex_total = exact.adapter[B_KEY] @ exact.adapter[A_KEY] + _delta_product(exact, "m")
    assert fedex_total.item() == pytest.approx(0.0, abs=1e-12)


def test_fedex_lora_reproduces_weighted_product_sum(make_adapter, dense_sum):
    # Prepare
    updates = [make_adapter() for _ in range(3)]
    # Execute
    result = fedex_lora.aggregate(updates, WEIGHTS)
    # Assert
    for prefix in PREFIXES:
        b_res, a_res = result.base_delta[prefix]
        assert b_res.shape == (24, 16) and a_res.shape == (16, 16)  # (n+1) r = 16
        got = _product(result.adapter, prefix) + b_res @ a_res
        torch.testing.assert_close(got, dense_sum(updates, WEIGHTS, prefix))
    p = normalise_weights(WEIGHTS)
    torch.testing.assert_close(
        result.adapter[f"{PREFIXES[0]}.lora_A.weight"],
        sum(pi * u[f"{PREFIXES[0]}.lora_A.weight"] for pi, u in zip(p, updates)),
    )
    assert not result.reinit_adapter


def test_flora_stacks_heterogeneous_ranks_into_base_delta(make_adapter, dense_sum):
    # Prepare
    updates = [make_adapter(r=r) for r in (2, 4, 8)]
    # Execute
    result = flora.aggregate(updates, WEIGHTS, seed=7)
    # Assert
    assert result.reinit_adapter
    for prefix in PREFIXES:
        assert result.base_delta[prefix][0].shape == (24, 14)
        torch.testing.assert_close(_delta_product(result, prefix), dense_sum(updates, WEIGHTS, prefix))
        fresh = result.adapter
        assert fresh[f"{prefix}.lora_A.weight"].shape == (8, 16)
        assert torch.count_nonzero(fresh[f"{prefix}.lora_B.weight"]) == 0
        assert torch.count_nonzero(fresh[f"{prefix}.lora_A.weight"]) > 0


def test_ffa_lora_is_exact_with_shared_frozen_a(make_adapter, dense_sum):
    # Prepare
    frozen = ffa_lora.init_frozen_a(
        {f"{p}.lora_A.weight": (4, 16) for p in PREFIXES}, seed=3, dtype=torch.float64
    )
    updates = []
    for _ in range(3):
        u = make_adapter()
        u.update({k: v.clone() for k, v in frozen.items()})
        updates.append(u)
    # Execute
    result = ffa_lora.aggregate(updates, WEIGHTS, global_adapter=updates[0])
    # Assert
    for prefix in PREFIXES:
        torch.testing.assert_close(_product(result.adapter, prefix), dense_sum(updates, WEIGHTS, prefix))
    assert result.base_delta is None


def test_ffa_lora_init_is_deterministic_and_rejects_different_a(make_adapter):
    # Prepare
    shapes = {"a": (4, 16), "b": (2, 9)}
    # Execute
    first = ffa_lora.init_frozen_a(shapes, seed=11)
    again = ffa_lora.init_frozen_a(dict(reversed(shapes.items())), seed=11)
    other = ffa_lora.init_frozen_a(shapes, seed=12)
    updates = [make_adapter(), make_adapter()]
    # Assert
    assert all(torch.equal(first[k], again[k]) for k in shapes)
    assert not torch.equal(first["a"], other["a"])
    assert first["a"].abs().max() <= 1 / 16**0.5
    with pytest.raises(ValueError, match="common frozen A"):
        ffa_lora.aggregate(updates, [1.0, 1.0])


@pytest.mark.parametrize(("r", "target"), [(4, 12), (8, 16)])
def test_flexlora_full_rank_is_exact(make_adapter, dense_sum, r, target):
    # Prepare: the sum has rank <= min(3 r, in = 16) = target, so keeping target components is
    # lossless; r = 8 stacks R = 24 > in, exercising the wide QR branch.
    updates = [make_adapter(r=r) for _ in range(3)]
    # Execute
    result = flexlora.aggregate(updates, WEIGHTS, rank=target)
    # Assert
    for prefix in PREFIXES:
        torch.testing.assert_close(_product(result.adapter, prefix), dense_sum(updates, WEIGHTS, prefix))
    assert result.metrics["flexlora_discarded_energy_max"] == pytest.approx(0.0, abs=1e-20)


def test_flexlora_heterogeneous_ranks_truncate_to_best_rank_k(make_adapter, dense_sum):
    # Prepare
    updates = [make_adapter(r=r) for r in (2, 4, 8)]
    dense = {p: dense_sum(updates, WEIGHTS, p) for p in PREFIXES}
    # Execute
    result = flexlora.aggregate(updates, WEIGHTS)  # default target rank: max = 8
    # Assert
    for prefix in PREFIXES:
        sv = torch.linalg.svdvals(dense[prefix])
        for k in (2, 4, 8):
            local = flexlora.truncate_for_rank(result.adapter, k)
            assert local[f"{prefix}.lora_A.weight"].shape == (k, 16)
            approx = _product(local, prefix)
            # Eckart-Young: best rank-k error in Frobenius norm is the tail of the singular values.
            err = torch.linalg.matrix_norm(dense[prefix] - approx)
            torch.testing.assert_close(err, sv[k:].pow(2).sum().sqrt())
            torch.testing.assert_close(torch.linalg.svdvals(approx)[:k], sv[:k])
    with pytest.raises(ValueError, match="cannot truncate"):
        flexlora.truncate_for_rank(result.adapter, 9)


def test_flexlora_keep_residual_makes_round_exact(make_adapter, dense_sum):
    # Prepare
    updates = [make_adapter(r=r) for r in (2, 4, 8)]
    # Execute
    result = flexlora.aggregate(updates, WEIGHTS, rank=3, keep_residual=True)
    # Assert
    for prefix in PREFIXES:
        got = _product(result.adapter, prefix) + _delta_product(result, prefix)
        torch.testing.assert_close(got, dense_sum(updates, WEIGHTS, prefix))
    assert 0 < result.metrics["flexlora_discarded_energy_max"] < 1


def test_fedadam_and_fedyogi_one_step_match_hand_computation():
    # Prepare: x = 1, silos 0 and 3 with weights 1:3 -> mean 2.25, pseudo-gradient g = -1.25.
    glob = {"w": torch.tensor([1.0], dtype=torch.float64)}
    updates = [
        {"w": torch.tensor([0.0], dtype=torch.float64)},
        {"w": torch.tensor([3.0], dtype=torch.float64)},
    ]
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    g = -1.25
    m = (1 - b1) * g
    v_adam = b2 * tau**2 + (1 - b2) * g**2
    v_yogi = tau**2 + (1 - b2) * g**2  # sign(tau^2 - g^2) = -1
    kw = {"global_adapter": glob, "eta": eta, "beta1": b1, "beta2": b2, "tau": tau}
    # Execute
    adam = get_strategy("fedadam").aggregate(updates, [1.0, 3.0], **kw)
    yogi = get_strategy("fedyogi").aggregate(updates, [1.0, 3.0], **kw)
    yogi2 = get_strategy("fedyogi").aggregate(updates, [1.0, 3.0], **(kw | {"state": yogi.state}))
    # Assert
    assert adam.adapter["w"].item() == pytest.approx(1.0 - eta * m / (v_adam**0.5 + tau), rel=1e-12)
    assert yogi.adapter["w"].item() == pytest.approx(1.0 - eta * m / (v_yogi**0.5 + tau), rel=1e-12)
    assert isinstance(yogi.state, fedopt.FedOptState) and yogi.state.step == 1 and yogi2.state.step == 2
    assert yogi.state.m["w"].item() == pytest.approx(m)
    assert yogi2.state.m["w"].item() == pytest.approx(b1 * m + (1 - b1) * g)
    assert glob["w"].item() == 1.0  # pure: input untouched


def test_linear_strategies_only_need_the_weighted_mean(make_adapter):
    # Prepare: what the server sees under secure aggregation is just the weighted mean.
    frozen = ffa_lora.init_frozen_a(
        {f"{p}.lora_A.weight": (4, 16) for p in PREFIXES}, seed=0, dtype=torch.float64
    )
    updates = [make_adapter() | frozen for _ in range(3)]
    glob = make_adapter() | frozen
    p = normalise_weights(WEIGHTS)
    mean = {k: weighted_mean([u[k] for u in updates], p) for k in updates[0]}
    mean |= frozen  # FFA-LoRA's A never travels; a float mean of identical A's is not bit-exact
    for name, strategy in STRATEGIES.items():
        if not strategy.linear:
            continue
        # Execute
        full = strategy.aggregate(updates, WEIGHTS, global_adapter=glob)
        via_mean = strategy.aggregate([mean], [1.0], global_adapter=glob)
        # Assert
        for key in full.adapter:
            torch.testing.assert_close(full.adapter[key], via_mean.adapter[key], msg=name)


def test_fedprox_proximal_term_value_and_gradient():
    # Prepare
    w = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    g = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    # Execute
    term = fedprox.proximal_term(w, g, mu=0.5)
    term.backward()
    # Assert: 0.25 * (1 + 4 + 4) = 2.25; gradient mu * (w - g).
    assert term.item() == pytest.approx(2.25)
    torch.testing.assert_close(w["a"].grad, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(w["b"].grad, torch.tensor([[1.0]]))


def test_registry_lookup_and_flags():
    # Execute / Assert: every module of the package registered itself (aliases, flags, options included).
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "ffa_lora", "fedex_lora", "flora", "flexlora"}
    assert all(isinstance(s, AggregationStrategy) and s.paper.startswith("arXiv") for s in STRATEGIES.values())
    assert get_strategy("FedEx-LoRA") is STRATEGIES["fedex_lora"]
    assert get_strategy("fedit").name == "fedavg"
    assert {n for n, s in STRATEGIES.items() if s.heterogeneous_rank} == {"flora", "flexlora"}
    assert not STRATEGIES["fedex_lora"].linear and STRATEGIES["ffa_lora"].linear
    assert not STRATEGIES["ffa_lora"].trains_a and STRATEGIES["fedprox"].client_options == {"mu": 0.01}
    assert STRATEGIES["fedadam"].options == {"eta", "beta1", "beta2", "tau"}
    with pytest.raises(KeyError, match="unknown federated strategy"):
        get_strategy("scaffold")
    with pytest.raises(ValueError, match="already registered"):
        register(AggregationStrategy("fedit", fedavg.aggregate, linear=True))


def test_a_strategy_entry_alone_drives_config_validation_and_checkpoints(tmp_path, make_adapter):
    # Prepare: a strategy added at runtime (as a new module would), with an option and a server state.
    def aggregate(updates, weights, *, state=None, damping=1.0, **kw):
        return AggregateResult(adapter=dict(updates[0]), state={"calls": (state or {}).get("calls", 0) + 1})

    entry = register(AggregationStrategy(
        "median_test", aggregate, linear=False, options=frozenset({"damping"}), aliases=("med",),
        save_state=lambda st: ({"calls": torch.tensor([st["calls"]])}, {"kind": "counter"}),
        load_state=lambda t, meta: {"calls": int(t["calls"].item()), "kind": meta["kind"]}))
    silos = [{"name": "a", "data": "a.jsonl"}, {"name": "b", "data": "b.jsonl"}]
    try:
        # Execute
        fcfg = federated_config({"silos": silos, "strategy": "med", "strategy_options": {"damping": 0.5}})
        snap = FederationSnapshot(round=1, adapter=make_adapter(), adapter_config={"r": 4}, strategy_state={"calls": 3})
        save_snapshot(tmp_path, snap, entry)
        back = load_snapshot(tmp_path, entry)
        # Assert
        assert fcfg.strategy_obj is entry and fcfg.server_options() == {"damping": 0.5} and fcfg.proximal_mu == 0
        assert back.strategy_state == {"calls": 3, "kind": "counter"} and back.round == 1
        with pytest.raises(ConfigError, match=r"strategy_options: \['mu'\] not accepted by median_test"):
            federated_config({"silos": silos, "strategy": "median_test", "strategy_options": {"mu": 0.1}})
        with pytest.raises(ConfigError, match="secure_aggregation: strategy 'median_test' is not linear"):
            federated_config({"silos": silos, "strategy": "median_test", "secure_aggregation": True})
        with pytest.raises(TypeError, match="declares no save_state"):
            save_snapshot(tmp_path, snap, STRATEGIES["fedavg"])
    finally:
        STRATEGIES.pop("median_test")


def test_rank_mismatch_rejected_by_same_rank_strategies(make_adapter):
    # Prepare
    updates = [make_adapter(r=2), make_adapter(r=4)]
    # Execute / Assert
    with pytest.raises(ValueError, match="different LoRA ranks"):
        fedex_lora.aggregate(updates, [1.0, 1.0])
