"""The coordinator's state machine without models or network: stragglers, screening, idempotent submits,
restart/resume, DP accounting, secure aggregation (a dropped silo recovered) against plain aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fineray.federated._lora import flatten
from fineray.federated.config import federated_config
from fineray.federated.dp import DPAccountant
from fineray.federated.federation import Federation, SubmitError, trainable_keys
from fineray.federated.secagg import AdvertisedKeys, SecAggClient, SecAggConfig
from fineray.federated.wire import pack_array, pack_tensors
from fineray.train.config import ConfigError, load_config

PREFIXES = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.up_proj")
ADAPTER_CONFIG = {"r": 4, "lora_alpha": 8, "use_rslora": False, "peft_type": "LORA"}


def _init() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for p in PREFIXES:
        out[f"{p}.lora_A.weight"] = torch.randn(4, 16, generator=gen) * 0.25
        out[f"{p}.lora_B.weight"] = torch.zeros(24, 4)
    return out


def _update(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def _blob(tensors: dict[str, torch.Tensor], n: int = 10, loss: float = 2.0) -> bytes:
    return pack_tensors(tensors, {"num_examples": n, "metrics": {"train_loss": loss}})


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fed(tmp: Path, silos: list[str], clock: FakeClock | None = None, **fed_keys) -> Federation:
    section = {"silos": [{"name": s} for s in silos], "rounds": 3, "min_silos": 2, "round_timeout_s": 60.0,
               **fed_keys}
    cfg = load_config(None, ["lora.r=4", "lora.alpha=8"])
    cfg.federated = section
    return Federation(cfg, federated_config(cfg), tmp / "state", clock=clock or FakeClock(),
                      noise_generator=torch.Generator().manual_seed(7),
                      init_adapter=lambda: (_init(), dict(ADAPTER_CONFIG)))


def test_straggler_times_out_and_round_completes_with_the_others(tmp_path: Path):
    # Prepare
    clock = FakeClock()
    fed = _fed(tmp_path, ["a", "b", "c"], clock)
    fed.open_round()
    g = fed.adapter
    ua, ub = _update(g, 1), _update(g, 2)
    fed.submit_update("a", 1, _blob(ua, n=10))
    fed.submit_update("b", 1, _blob(ub, n=30))
    # Execute
    before_deadline = fed.tick()
    clock.t += 61.0
    row = fed.tick()
    # Assert
    assert before_deadline is None
    assert row["status"] == "ok" and row["accepted"] == ["a", "b"] and row["stragglers"] == ["c"]
    for k in g:
        torch.testing.assert_close(fed.adapter[k], 0.25 * ua[k] + 0.75 * ub[k])
    assert fed.round == 1 and fed.current is None
    with pytest.raises(SubmitError) as late:
        fed.submit_update("c", 1, _blob(_update(g, 3)))
    assert late.value.status == 409


def test_bad_updates_are_rejected_and_reported_while_the_round_continues(tmp_path: Path):
    # Prepare
    silos = ["good", "nan", "keys", "shape", "norm", "bytes", "count"]
    fed = _fed(tmp_path, silos, min_silos=1, max_update_norm=1.0)
    fed.open_round()
    g = fed.adapter
    key0 = next(iter(g))
    nan = _update(g, 1)
    nan[key0][0, 0] = float("nan")
    keys = {**_update(g, 2), "base_model.model.lm_head.weight": torch.zeros(3, 3)}
    shape = _update(g, 3)
    shape[key0] = torch.zeros(4, 17)
    big = _update(g, 4, scale=1.0)
    # Execute
    answers = {
        "good": fed.submit_update("good", 1, _blob(_update(g, 5))),
        "nan": fed.submit_update("nan", 1, _blob(nan)),
        "keys": fed.submit_update("keys", 1, _blob(keys)),
        "shape": fed.submit_update("shape", 1, _blob(shape)),
        "norm": fed.submit_update("norm", 1, _blob(big)),
        "bytes": fed.submit_update("bytes", 1, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all"),
        "count": fed.submit_update("count", 1, pack_tensors(_update(g, 6), {"num_examples": 0})),
    }
    row = fed.tick()
    # Assert
    assert answers["good"] == "accepted"
    assert all(answers[s].startswith("rejected") for s in silos[1:])
    assert row["status"] == "ok" and row["accepted"] == ["good"] and row["stragglers"] == []
    rej = row["rejected"]
    assert set(rej) == set(silos[1:])
    assert any("non-finite" in r for r in rej["nan"])
    assert any("unexpected keys" in r for r in rej["keys"])
    assert any("shape of" in r for r in rej["shape"])
    assert any("exceeds bound" in r for r in rej["norm"])
    assert any("malformed" in r for r in rej["bytes"])
    assert any("num_examples" in r for r in rej["count"])


def test_submit_is_idempotent_per_round_and_silo(tmp_path: Path):
    # Prepare
    fed = _fed(tmp_path, ["a", "b"])
    fed.open_round()
    g = fed.adapter
    first, second = _update(g, 1), _update(g, 2)
    # Execute
    answers = [fed.submit_update("a", 1, _blob(first)), fed.submit_update("a", 1, _blob(second))]
    fed.submit_update("b", 1, _blob(first))
    row = fed.tick()
    # Assert: the reconnecting silo's second copy is ignored; the first counts.
    assert answers == ["accepted", "duplicate"]
    assert row["accepted"] == ["a", "b"]
    for k in g:
        torch.testing.assert_close(fed.adapter[k], first[k])
    with pytest.raises(SubmitError, match="not a participant"):
        fed.open_round()
        fed.submit_update("zed", 2, _blob(first))


def test_restart_resumes_at_the_next_round_with_state_and_accountant(tmp_path: Path):
    # Prepare: FedAdam (server optimiser state) with DP (accountant state).
    dp = {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}
    fed = _fed(tmp_path, ["a", "b", "c"], strategy="fedadam", dp=dp)
    fed.open_round()
    for i, s in enumerate(["a", "b", "c"]):
        fed.submit_update(s, 1, _blob(_update(fed.adapter, i)))
    fed.tick()
    fed.open_round()  # round 2 is open when the coordinator "crashes"
    fed.submit_update("a", 2, _blob(_update(fed.adapter, 9)))
    # Execute
    again = _fed(tmp_path, ["a", "b", "c"], strategy="fedadam", dp=dp)
    reopened = again.open_round()
    # Assert
    assert again.resumed and again.round == 1 and reopened.round == 2 and reopened.responded == {}
    for k in fed.adapter:
        assert torch.equal(again.adapter[k], fed.adapter[k])
        assert torch.equal(again.strategy_state.m[k], fed.strategy_state.m[k])
        assert torch.equal(again.strategy_state.v[k], fed.strategy_state.v[k])
    assert again.strategy_state.step == 1
    assert again.epsilon() == pytest.approx(fed.epsilon()) and again.epsilon() > 0
    assert [r["round"] for r in again.history] == [1] and again.history[0]["accepted"] == ["a", "b", "c"]
    assert (tmp_path / "state" / "LATEST").read_text() == "round_000001"
    with pytest.raises(ConfigError, match="different model, LoRA, strategy"):
        _fed(tmp_path, ["a", "b", "c"], strategy="fedyogi", dp=dp)


def test_dp_epsilon_is_reported_after_every_round(tmp_path: Path):
    # Prepare
    dp = {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.3, "delta": 1e-4}
    fed = _fed(tmp_path, ["a", "b", "c", "d"], dp=dp, fraction_fit=0.5)
    reference = DPAccountant(1.3, 0.5, 1e-4)
    # Execute
    rows = []
    for _ in range(3):
        cur = fed.open_round()
        for i, s in enumerate(cur.participants):
            fed.submit_update(s, cur.round, _blob(_update(fed.adapter, 10 * cur.round + i)))
        rows.append(fed.tick())
    # Assert
    eps = [r["epsilon"] for r in rows]
    assert all(len(r["participants"]) == 2 for r in rows)
    assert eps == pytest.approx([reference.epsilon_after(k) for k in (1, 2, 3)])
    assert eps[0] < eps[1] < eps[2]
    assert all(np.isfinite(list(r["update_norms"].values())).all() for r in rows)


class SecAggSilos:
    """Silos running the secure-aggregation steps against a Federation, as ``SiloWorker`` does over a transport."""

    def __init__(self, fed: Federation, updates: dict[str, dict[str, torch.Tensor]], counts: dict[str, int]):
        self.fed, self.updates, self.counts, self.clients = fed, updates, counts, {}

    def keys(self, silos: list[str]) -> None:
        for s in silos:
            sa = self.fed.train_task(s)["secagg"]
            self.clients[s] = SecAggClient(sa["id"], SecAggConfig(**sa["config"]), round_id=self.fed.current.round)
            self.fed.submit_key(s, self.fed.current.round, self.clients[s].keys.to_json(), self.counts[s],
                                {"train_loss": 1.0})

    def step(self, silos: list[str]) -> list[str]:
        """Each silo does the step the coordinator asks of it; returns the answers."""
        fed, answers = self.fed, []
        for s in silos:
            task, client = fed.secagg_task(s), self.clients[s]
            rno = task["round"]
            if task["status"] == "share":
                keyset = {int(i): AdvertisedKeys.from_json(k) for i, k in task["keyset"].items()}
                shares = client.share(keyset, task["threshold"])
                answers.append(fed.submit_shares(s, rno, {str(v): ct.hex() for v, ct in shares.items()}))
            elif task["status"] == "mask":
                g = fed.adapter
                delta, _ = flatten({k: self.updates[s][k].double() - g[k].double() for k in trainable_keys(g, fed.fcfg)})
                inbox = {int(u): bytes.fromhex(ct) for u, ct in task["shares"].items()}
                answers.append(fed.submit_masked(s, rno, pack_array(client.mask(delta, float(self.counts[s]), inbox))))
            else:
                answers.append(fed.submit_reveal(s, rno, client.reveal(task["survivors"], task["dropped"]).to_json()))
        return answers


def test_secure_aggregation_recovers_a_silo_dropped_after_sharing_and_equals_the_survivors_plain_mean(tmp_path: Path):
    # Prepare: five silos train and send keys (threshold: a majority, 3). "e" never shares its keys; "c"
    # shares them (so every other silo's vector carries a mask shared with "c") but never masks.
    clock = FakeClock()
    names = ["a", "b", "c", "d", "e"]
    sa = {"enabled": True, "clip": 2.0, "frac_bits": 24, "mask_timeout_s": 10.0}
    fed = _fed(tmp_path / "s", names, clock, secure_aggregation=sa)
    plain = _fed(tmp_path / "p", names)
    fed.open_round()
    plain.open_round()
    g = fed.adapter
    updates = {s: _update(g, i) for i, s in enumerate(names)}
    counts = {"a": 12, "b": 30, "c": 5, "d": 7, "e": 9}
    silos = SecAggSilos(fed, updates, counts)
    # Execute
    silos.keys(names)
    assert fed.tick() is None and fed.current.phase == "share"
    assert silos.step(["a", "b", "c", "d"]) == ["accepted"] * 4
    assert fed.tick() is None and fed.current.phase == "share"  # waits for "e" until the deadline
    clock.t += 11.0
    assert fed.tick() is None and fed.current.phase == "mask" and fed.secagg_task("e") is None
    assert silos.step(["a", "b", "d"]) == ["accepted"] * 3
    assert fed.submit_masked("a", 1, b"anything") == "duplicate"
    clock.t += 11.0
    assert fed.tick() is None and fed.current.phase == "unmask"
    assert fed.secagg_task("a")["dropped"] == [fed.silo_ids["c"]]
    assert silos.step(["a", "b", "d"]) == ["accepted"] * 3
    row = fed.tick()
    for s in ("a", "b", "d"):
        plain.submit_update(s, 1, _blob(updates[s], n=counts[s]))
    plain_row = plain.close_round()
    # Assert: one pass, no re-run; the aggregate is the survivors' plain example-weighted mean.
    assert row["status"] == "ok" and row["accepted"] == ["a", "b", "d"] == plain_row["accepted"]
    assert row["dropped"] == ["c", "e"] and row["stragglers"] == [] and row["num_examples"] == 49
    for k in g:  # quantisation: 2^-24 per element and unit of weight, summed over 3 silos
        torch.testing.assert_close(fed.adapter[k], plain.adapter[k], atol=1e-6, rtol=0)


def test_fewer_survivors_than_the_threshold_fail_the_round_and_keep_the_adapter(tmp_path: Path):
    # Prepare: threshold 3 of 3 silos; "c" drops after sharing.
    clock = FakeClock()
    sa = {"enabled": True, "clip": 2.0, "threshold": 3, "mask_timeout_s": 10.0}
    fed = _fed(tmp_path, ["a", "b", "c"], clock, secure_aggregation=sa)
    fed.open_round()
    before = {k: v.clone() for k, v in fed.adapter.items()}
    silos = SecAggSilos(fed, {s: _update(before, i) for i, s in enumerate("abc")}, {"a": 1, "b": 2, "c": 3})
    silos.keys(["a", "b", "c"])
    fed.tick()
    silos.step(["a", "b", "c"])
    fed.tick()
    silos.step(["a", "b"])
    # Execute
    clock.t += 11.0
    row = fed.tick()
    # Assert
    assert row["status"] == ("failed: secure aggregation: only 2 of 3 silos delivered masked vectors, fewer than "
                             "the threshold 3: the dropped silos' masks cannot be removed")
    assert row["accepted"] == [] and row["dropped"] == ["c"] and fed.round == 1
    assert all(torch.equal(fed.adapter[k], before[k]) for k in before)
    assert fed.open_round().round == 2
    with pytest.raises(ConfigError, match="federated.secure_aggregation: threshold 4 exceeds the 3 silos"):
        _fed(tmp_path / "x", ["a", "b", "c"], secure_aggregation={**sa, "threshold": 4})


def test_ffa_lora_keeps_a_exact_under_secure_aggregation_keys_and_rejects_a_change(tmp_path: Path):
    # Prepare
    fed = _fed(tmp_path, ["a", "b"], strategy="ffa_lora")
    fed.open_round()
    g = fed.adapter
    moved_a = _update(g, 1)
    kept_a = {k: (v if ".lora_A." in k else v + 0.01) for k, v in g.items()}
    # Execute
    bad = fed.submit_update("a", 1, _blob(moved_a))
    good = fed.submit_update("b", 1, _blob(kept_a))
    # Assert
    assert bad.startswith("rejected") and "FFA-LoRA keeps A frozen" in bad
    assert good == "accepted"
    assert all(".lora_B." in k for k in trainable_keys(g, fed.fcfg))


def test_exact_strategies_fold_a_residual_and_heterogeneous_ranks_round_trip(tmp_path: Path):
    # Prepare: FedEx-LoRA (residual into the base), and FlexLoRA with a rank-2 silo next to rank-4 ones.
    fedex = _fed(tmp_path / "x", ["a", "b"], strategy="fedex_lora")
    flex = _fed(tmp_path / "f", ["a", "b", "c"], strategy="flexlora")
    flex_cfg = flex.fcfg.model_copy(update={"silos": [s.model_copy(update={"rank": 2}) if s.name == "c" else s
                                                       for s in flex.fcfg.silos]})
    flex = Federation(flex.run_cfg, flex_cfg, tmp_path / "f2", clock=FakeClock(),
                      init_adapter=lambda: (_init(), dict(ADAPTER_CONFIG)))
    # Execute
    fedex.open_round()
    ua, ub = _update(fedex.adapter, 1, 0.3), _update(fedex.adapter, 2, 0.3)
    fedex.submit_update("a", 1, _blob(ua))
    fedex.submit_update("b", 1, _blob(ub))
    fedex_row = fedex.tick()
    flex.open_round()
    small, _, small_cfg = flex.adapter_blob("c")
    from fineray.federated.wire import unpack_tensors

    small_t, _ = unpack_tensors(small)
    answers = [flex.submit_update(s, 1, _blob(_update(flex.adapter, i))) for i, s in enumerate(["a", "b"])]
    answers.append(flex.submit_update("c", 1, _blob(_update(small_t, 3))))
    flex_row = flex.tick()
    # Assert: W0 + R + s B A equals the exact mean of the silo products; the exported adapter is larger.
    s = fedex.scaling
    for prefix in PREFIXES:
        a_k, b_k = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        exact = s * 0.5 * (ua[b_k] @ ua[a_k] + ub[b_k] @ ub[a_k])
        rb, ra = fedex.residual[prefix]
        torch.testing.assert_close(rb @ ra + s * fedex.adapter[b_k] @ fedex.adapter[a_k], exact, atol=1e-5, rtol=1e-5)
    _, ex_cfg = fedex.export()
    assert fedex_row["status"] == "ok" and fedex.residual_blob() is not None and ex_cfg["r"] > 4
    assert small_cfg["r"] == 2 and small_t[f"{PREFIXES[0]}.lora_A.weight"].shape == (2, 16)
    assert answers == ["accepted"] * 3 and flex_row["status"] == "ok"
    assert flex.adapter[f"{PREFIXES[0]}.lora_A.weight"].shape == (4, 16)
