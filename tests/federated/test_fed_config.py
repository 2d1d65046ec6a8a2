"""The typed federated section: errors name `federated.<key>` and say why."""

from __future__ import annotations

import pytest

from fineray.federated.config import federated_config
from fineray.train.config import ConfigError, load_config

SILOS = [{"name": "acme", "data": "a.jsonl"}, {"name": "globex", "data": "b.jsonl"}]


def _section(**kw):
    return {"silos": SILOS, **kw}


def test_valid_section_has_defaults_and_bool_shorthand():
    # Execute
    f = federated_config(_section(secure_aggregation=True, strategy="ffa", local_epochs=0.5))
    # Assert
    assert f.strategy == "ffa_lora" and f.secure_aggregation.enabled and f.local_steps is None
    assert f.participants_per_round() == 2 and not f.trains_a


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        (_section(rounds=0), "federated.rounds"),
        (_section(typo=1), "federated.typo: unknown key"),
        (_section(silos=[{"name": "x", "dat": "y"}, {"name": "z"}]), "federated.silos.0.dat: unknown key"),
        (_section(strategy="fedmagic"), "federated.strategy: unknown strategy"),
        (_section(min_silos=3), "federated.min_silos: 3 exceeds the 2 silos"),
        (_section(local_steps=3, local_epochs=1.0), "federated.local_steps: .*exclusive"),
        (_section(strategy="fedavg", strategy_options={"eta": 0.1}), "federated.strategy_options: .* not accepted by fedavg"),
        (_section(secure_aggregation={"enabled": True, "modulus_bits": 48}), "federated.secure_aggregation.modulus_bits"),
        (_section(silos=[{"name": "a", "rank": 4}, {"name": "b"}]), "federated.silos: per-silo .rank. needs a heterogeneous-rank strategy"),
        (_section(silos=[{"name": "a"}, {"name": "a"}]), "federated.silos: duplicate names"),
    ],
)
def test_errors_name_the_key(section, needle):
    with pytest.raises(ConfigError, match=needle):
        federated_config(section)


@pytest.mark.parametrize("strategy", ["fedex_lora", "flora", "flexlora"])
def test_secure_aggregation_and_dp_need_a_linear_strategy(strategy):
    # Execute / Assert: the message says why and what to use instead.
    with pytest.raises(ConfigError, match=r"federated\.secure_aggregation: strategy .* is not linear.*weighted mean"):
        federated_config(_section(strategy=strategy, secure_aggregation=True))
    with pytest.raises(ConfigError, match=r"federated\.dp: strategy .* is not linear"):
        federated_config(_section(strategy=strategy, dp={"enabled": True}))
    for linear in ("fedavg", "fedprox", "ffa_lora"):
        assert federated_config(_section(strategy=linear, secure_aggregation=True, dp={"enabled": True}))


def test_section_read_from_run_config_with_relative_silo_paths(tmp_path):
    # Prepare
    (tmp_path / "silo.jsonl").write_text("{}\n")
    (tmp_path / "run.yaml").write_text(
        "data: {train: fineray:support-tickets}\n"
        "federated:\n  silos: [{name: a, data: silo.jsonl}, {name: b, data: silo.jsonl}]\n  rounds: 2\n")
    # Execute
    f = federated_config(load_config(tmp_path / "run.yaml"))
    # Assert
    assert f.silos[0].data == str(tmp_path / "silo.jsonl") and f.rounds == 2
    with pytest.raises(ConfigError, match="federated section is missing"):
        federated_config(load_config(None))


def test_coordinator_refuses_to_serve_without_tls_or_authentication(tmp_path):
    # Prepare
    from fineray.federated import run_coordinator
    from fineray.federated.server import load_tokens

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    cfg.federated = _section()
    (tmp_path / "tokens.yaml").write_text("acme: s3cret\nglobex: other\n")
    (tmp_path / "bad.yaml").write_text("acme: 3\n")
    # Execute / Assert
    assert load_tokens(tmp_path / "tokens.yaml") == {"acme": "s3cret", "globex": "other"}
    with pytest.raises(ConfigError, match="mapping of silo name"):
        load_tokens(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="HTTPS only"):
        run_coordinator(cfg, "127.0.0.1", 0, None, None, None, {"acme": "x"})
    with pytest.raises(ConfigError, match="without authentication"):
        run_coordinator(cfg, "127.0.0.1", 0, "c.pem", "k.pem", None, None)
    with pytest.raises(ConfigError, match="not in federated.silos"):
        run_coordinator(cfg, "127.0.0.1", 0, "c.pem", "k.pem", None, {"mallory": "x"})
    with pytest.raises(ConfigError, match=r"cannot load the coordinator's TLS files \(cert c.pem"):
        run_coordinator(cfg, "127.0.0.1", 0, "c.pem", "k.pem", None, {"acme": "x"})
