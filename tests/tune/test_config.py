"""The tune section and search space: validation errors name the key before Ray starts; base point, trial
configs, Pareto front and best-trial selection (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fineray.train.config import ConfigError, RunConfig, load_config
from fineray.tune.config import (
    TuneConfig,
    base_point,
    parse_distribution,
    parse_tune_config,
    validate_search_space,
)
from fineray.tune.report import pick_best, write_best_config, write_plots
from fineray.tune.sweep import check_objectives, run_sweep, trial_resources
from fineray.tune.trainable import trial_config

GOOD_SPACE = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "lora.r": {"choice": [4, 8, 16, 32]},
              "lora.alpha": {"choice": [8, 16, 32, 64]}, "lora.dropout": {"uniform": [0.0, 0.1]},
              "train.warmup_ratio": {"uniform": [0.0, 0.1]}}


def sweep_cfg(space: dict[str, Any] | None = None, **tune: Any) -> RunConfig:
    cfg = load_config(None, ["model.base=tiny:llama", "train.lr=2e-4", "lora.r=8", "lora.alpha=16"])
    cfg.tune = {"metric": "val_loss", "mode": "min", "num_samples": 4,
                "search_space": GOOD_SPACE if space is None else space, **tune}
    return cfg


def test_good_space_parses_every_distribution() -> None:
    # Prepare
    cfg = sweep_cfg({**GOOD_SPACE, "train.grad_accum": {"randint": [1, 4]},
                     "train.weight_decay": {"quniform": [0.0, 0.1, 0.05]}})
    # Execute
    space = validate_search_space(cfg)
    # Assert
    assert {k: d.kind for k, d in space.items()} == {
        "train.lr": "loguniform", "lora.r": "choice", "lora.alpha": "choice", "lora.dropout": "uniform",
        "train.warmup_ratio": "uniform", "train.grad_accum": "randint", "train.weight_decay": "quniform"}
    assert space["train.lr"].to_optuna().log is True
    assert space["train.grad_accum"].to_optuna().high == 4


@pytest.mark.parametrize("key, spec, needle", [
    ("train.lrr", {"uniform": [0.1, 0.2]}, "tune.search_space.train.lrr: not a RunConfig setting"),
    ("lora", {"choice": [1, 2]}, "tune.search_space.lora: is a whole section"),
    ("train.", {"choice": [1, 2]}, "tune.search_space.train.: keys are dotted"),
    ("model.nope", {"choice": ["a"]}, "tune.search_space.model.nope: not a RunConfig setting"),
    ("tune.num_samples", {"choice": [1, 2]}, "tune.search_space.tune.num_samples: the tune section"),
    ("train.lr", {"gaussian": [0.1, 0.2]}, "train.lr: unknown distribution 'gaussian'"),
    ("train.lr", {"uniform": [0.1]}, "train.lr: uniform takes 2 numbers"),
    ("train.lr", {"loguniform": [1e-3, 1e-5]}, "train.lr: low must be < high"),
    ("train.lr", {"uniform": [0.1, 0.1]}, "train.lr: low must be < high"),
    ("train.lr", {"loguniform": [0.0, 1e-3]}, "train.lr: loguniform bounds must be > 0"),
    ("train.lr", {"uniform": ["a", 1]}, "train.lr: uniform arguments must be finite numbers"),
    ("train.lr", [1e-5, 1e-3], "train.lr: expected one distribution"),
    ("train.lr", {"uniform": [0, 1], "choice": [1]}, "train.lr: expected one distribution"),
    ("lora.r", {"choice": []}, "lora.r: choice needs at least one value"),
    ("lora.r", {"choice": [4, 4]}, "lora.r: choice has duplicate values"),
    ("lora.r", {"randint": [1.5, 4]}, "lora.r: randint bounds must be integers"),
    ("lora.r", {"choice": [0, 8]}, "lora.r: value 0 is not valid for the run config"),
    ("lora.dropout", {"uniform": [0.0, 1.5]}, "lora.dropout: value 1.5 is not valid"),
    ("train.lr", {"uniform": [-1.0, 1.0]}, "train.lr: value -1.0 is not valid"),
    ("method", {"choice": ["lora", "lorax"]}, "method: value 'lorax' is not valid"),
])
def test_bad_search_space_names_the_key(key: str, spec: Any, needle: str) -> None:
    # Prepare
    cfg = sweep_cfg({"lora.alpha": {"choice": [8, 16]}, key: spec})
    # Execute
    with pytest.raises(ConfigError) as err:
        validate_search_space(cfg)
    # Assert
    assert needle in str(err.value)


@pytest.mark.parametrize("tune, needle", [
    ({"metirc": "val_loss"}, "tune.metirc: unknown key"),
    ({"metric": ["val_loss", "trainable_params"], "mode": ["min"]}, "metric has 2 entries but mode has 1"),
    ({"num_samples": 0}, "tune.num_samples"),
    ({"scheduler": {"type": "hyperband"}}, "tune.scheduler.type"),
    ({"scheduler": {"type": "asha", "metric": "field_accuracy"}}, "is not reported during training"),
    ({"registry_name": "../evil"}, "invalid adapter name"),
    ({"search_space": {}}, "search_space is empty"),
])
def test_bad_tune_section_names_the_key(tune: dict[str, Any], needle: str) -> None:
    # Prepare
    cfg = sweep_cfg(**tune)
    # Execute / Assert
    with pytest.raises(ConfigError, match="invalid tune section") as err:
        parse_tune_config(cfg)
    assert needle in str(err.value)


def test_unknown_objective_is_rejected_and_eval_objectives_are_detected() -> None:
    # Prepare
    bad, good = sweep_cfg(metric="field_acc"), sweep_cfg(metric="field_accuracy", mode="max")
    no_heldout = sweep_cfg(metric="field_accuracy", mode="max")
    good.eval.data = "fineray:support-tickets/test"
    # Execute / Assert
    with pytest.raises(ConfigError, match="'field_acc' is neither a training metric"):
        check_objectives(bad, parse_tune_config(bad))
    with pytest.raises(ConfigError, match="needs the held-out evaluation: set eval.data"):
        check_objectives(no_heldout, parse_tune_config(no_heldout))
    tcfg = parse_tune_config(good)
    check_objectives(good, tcfg)
    assert tcfg.needs_eval and tcfg.scheduler_target() == ("val_loss", "min")
    assert not parse_tune_config(sweep_cfg()).needs_eval


def test_run_sweep_rejects_a_bad_space_before_starting_ray(tmp_path: Path) -> None:
    # Prepare
    cfg = sweep_cfg({"train.lrr": {"uniform": [0.1, 0.2]}})
    cfg.output.dir = str(tmp_path)
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # another module's shared Ray
    # Execute
    with pytest.raises(ConfigError, match="train.lrr"):
        run_sweep(cfg, progress=False)
    # Assert: nothing was written and Ray was never initialised by this call
    assert list(tmp_path.iterdir()) == []
    assert ray_before or "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_base_point_uses_base_values_clipped_into_the_space() -> None:
    # Prepare: base lr 2e-4 inside, r 8 in choices, alpha 16.0 (float) matches choice 16, dropout 0.05 is
    # inside [0, 0.1]; warmup 0.03 outside [0.05, 0.1] is clipped to 0.05
    cfg = sweep_cfg({**GOOD_SPACE, "train.warmup_ratio": {"uniform": [0.05, 0.1]}, "lora.r": {"choice": [4, 16]}})
    space = validate_search_space(cfg)
    # Execute
    point = base_point(cfg, space)
    # Assert
    assert point == {"train.lr": 2e-4, "lora.r": 4, "lora.alpha": 16, "lora.dropout": 0.05,
                     "train.warmup_ratio": 0.05}
    assert type(point["lora.alpha"]) is int  # Optuna's categorical needs the exact choice object


def test_trial_config_applies_params_and_isolates_outputs() -> None:
    # Prepare
    base = sweep_cfg().to_dict()
    # Execute
    cfg = trial_config(base, {"train.lr": 3e-4, "lora.r": 16}, "/sweeps/s1", "abc123")
    # Assert
    assert (cfg.train.lr, cfg.lora.r) == (3e-4, 16)
    assert (cfg.output.dir, cfg.output.name, cfg.output.register_adapter) == ("/sweeps/s1/trials", "abc123", False)
    assert cfg.tune is None and cfg.eval.enabled is False


def test_trial_resources_pack_one_worker_trials_into_one_cpu() -> None:
    # Prepare
    cfg = sweep_cfg()
    cfg.scaling.num_workers = 1
    gpu = sweep_cfg()
    gpu.scaling.num_workers, gpu.scaling.use_gpu, gpu.scaling.resources_per_worker = 2, True, {"GPU": 0.25}
    # Execute / Assert
    assert trial_resources(cfg) == ({"CPU": 0.99}, 1.0, 0.0)
    assert trial_resources(gpu) == ({"GPU": 0.25, "CPU": 1.0}, 2.01, 0.5)


def rec(tid: str, loss: float | None, params: float, status: str = "TERMINATED") -> dict[str, Any]:
    return {"trial_id": tid, "status": status, "params": {"train.lr": 1e-4, "lora.r": 8},
            "metrics": {"val_loss": loss, "trainable_params": params}, "step": 6}


def test_pick_best_single_and_pareto_front() -> None:
    # Prepare
    records = [rec("a", 2.0, 100), rec("b", 1.5, 400), rec("c", 1.8, 50), rec("d", 1.9, 500),
               rec("e", 1.0, 10, status="ERROR"), rec("f", None, 10)]
    # Execute
    best, _ = pick_best(records, ["val_loss"], ["min"])
    best_multi, front = pick_best(records, ["val_loss", "trainable_params"], ["min", "min"])
    best_max, _ = pick_best(records, ["val_loss"], ["max"])
    # Assert: errors and missing metrics never win; d is dominated by b (1.5 < 1.9, 400 < 500), a by c
    assert best["trial_id"] == "b" and best_max["trial_id"] == "a"
    assert sorted(r["trial_id"] for r in front) == ["b", "c"]
    assert best_multi["trial_id"] == "b"
    assert pick_best([rec("x", None, 1)], ["val_loss"], ["min"]) == ({}, [])


def test_best_config_is_a_plain_run_config(tmp_path: Path) -> None:
    # Prepare
    base = sweep_cfg().to_dict()
    best = {"trial_id": "abc", "params": {"train.lr": 5e-4, "lora.r": 32}, "metrics": {"val_loss": 1.23}}
    # Execute
    path = write_best_config(base, best, "sweep-x", tmp_path / "best_config.yaml", ["val_loss"])
    cfg = load_config(path)
    # Assert
    assert (cfg.train.lr, cfg.lora.r, cfg.tune) == (5e-4, 32, None)
    assert cfg.output.name == "sweep-x-best" and cfg.output.register_adapter is True
    assert "tune" not in yaml.safe_load(path.read_text())


def test_plots_for_two_objectives(tmp_path: Path) -> None:
    # Prepare
    space = validate_search_space(sweep_cfg({"train.lr": {"loguniform": [1e-5, 1e-3]}, "lora.r": {"choice": [8]}}))
    records = [{**rec(str(i), 2.0 - 0.1 * i, 100 + 10 * i), "params": {"train.lr": 1e-5 * (i + 1), "lora.r": 8}}
               for i in range(4)]
    # Execute
    paths = write_plots(records, space, ["val_loss", "trainable_params"], ["min", "min"], tmp_path)
    # Assert
    assert [p.name for p in paths] == ["optimization_history.png", "param_importances.png", "pareto_front.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_yaml_string_numbers_and_nested_override_keys_are_accepted() -> None:
    # Prepare: PyYAML reads `1e-5` as a string; CLI overrides give nested keys
    cfg = load_config(None, ["model.base=tiny:llama", "tune.search_space.train.lr={loguniform: [1e-5, 1e-3]}",
                             "tune.search_space.lora.r={choice: [4, 8]}", "tune.num_samples=3"])
    # Execute
    space = validate_search_space(cfg)
    # Assert
    assert space["train.lr"].args == [1e-5, 1e-3] and space["lora.r"].args == [4, 8]
    assert parse_tune_config(cfg).num_samples == 3


def test_parse_distribution_choice_accepts_strings_and_bools() -> None:
    # Execute
    d = parse_distribution("train.scheduler", {"choice": ["cosine", "linear"]})
    # Assert
    assert d.contains("linear") and not d.contains("constant") and d.clip("constant") == "cosine"
    assert isinstance(TuneConfig.model_validate({"search_space": {"a.b": {"choice": [True]}}}), TuneConfig)
