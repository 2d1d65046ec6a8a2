"""Run config: YAML + overrides, validation errors that name the key or line."""

from pathlib import Path

import pytest

from fineray.train.config import ConfigError, RunConfig, apply_overrides, config_hash, load_config


def test_defaults_and_overrides_have_natural_types():
    cfg = load_config(None, ["train.lr=1e-4", "scaling.num_workers=3", "lora.target_modules=[q_proj,v_proj]",
                             "data.packing=true"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.scaling.num_workers == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True
    assert cfg.model.base == "embedded:smollm2-135m-instruct"


def test_yaml_file_then_override_wins(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("method: dora\ntrain:\n  lr: 0.001\n  max_steps: 5\n")
    cfg = load_config(p, ["train.max_steps=7"])
    assert (cfg.method, cfg.train.lr, cfg.train.max_steps) == ("dora", 0.001, 7)


def test_unknown_key_is_named(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(p)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train\.lr:.*greater than 0"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"method:"):
        load_config(None, ["method=prefix"])
    with pytest.raises(ConfigError, match=r"data\.validation"):
        load_config(None, ["data.validation=1.5"])


def test_broken_yaml_names_file_and_line(tmp_path: Path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  lr: 0.1\n  batch_size: [1, 2\nscaling: {}\n")
    with pytest.raises(ConfigError, match=r"broken YAML at .*broken\.yaml:\d+"):
        load_config(p)


def test_missing_file_and_bad_override_syntax(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_cross_check_qlora_deepspeed():
    with pytest.raises(ConfigError, match="qlora cannot run with train.strategy=deepspeed"):
        load_config(None, ["method=qlora", "train.strategy=deepspeed"])


def test_relative_data_paths_resolve_against_config_dir(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    p = tmp_path / "run.yaml"
    p.write_text("data:\n  train: d.jsonl\n")
    assert load_config(p).data.train == str(tmp_path / "d.jsonl")


def test_multitask_list_and_hash_stability():
    data = apply_overrides({}, ["output.name=x"])
    data["data"] = {"train": [{"path": "a.jsonl", "weight": 2, "task_prefix": "A"}, {"path": "b.jsonl"}]}
    cfg = RunConfig.model_validate(data)
    assert [s.weight for s in cfg.data.sources()] == [2, 1]
    assert config_hash(cfg) == config_hash(RunConfig.model_validate(data))


def test_micro_batch_tokens_refused_with_deepspeed_naming_the_field():
    with pytest.raises(ConfigError, match=r"train.*micro_batch_tokens is not supported with strategy=deepspeed"):
        load_config(None, ["train.strategy=deepspeed", "train.micro_batch_tokens=4096"])
    assert load_config(None, ["train.micro_batch_tokens=4096"]).train.micro_batch_tokens == 4096


def test_fast_path_switches_resolve_per_device():
    from fineray.train.fastpath import resolve_fast

    cpu = resolve_fast(load_config(None, ["train.fast.compile_attention=true"]), use_gpu=False)
    assert not cpu.packing and not cpu.balance_ranks and not cpu.compile_attention
    packed = resolve_fast(load_config(None, ["data.packing=true"]), use_gpu=False)
    assert packed.balance_ranks  # auto: on with packing
    off = resolve_fast(load_config(None, ["data.packing=true", "train.fast.balance_ranks=false"]), use_gpu=False)
    assert not off.balance_ranks
