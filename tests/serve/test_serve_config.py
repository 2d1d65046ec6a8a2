"""ServeConfig: YAML + overrides, errors that name the key, rollout validation, the shipped example config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fineray.serve.config import load_serve_config
from fineray.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_serve_yaml_loads_with_defaults():
    cfg = load_serve_config(ROOT / "configs" / "serve.yaml")
    assert cfg.base == "embedded:smollm2-135m-instruct"
    assert cfg.batching.max_batch_size == 16 and cfg.limits.max_tokens == 512
    assert cfg.autoscaling.min_replicas == 1 and cfg.rollouts == {}


def test_overrides_nested_and_dotted_and_none_ignored(tmp_path):
    # Prepare
    path = tmp_path / "serve.yaml"
    path.write_text("base: tiny:llama\nbatching: {max_batch_size: 4}\nport: 9000\n")
    # Execute
    cfg = load_serve_config(path, {"registry": "/x/adapters", "port": None, "batching.batch_wait_timeout_s": 0.1,
                                   "limits": {"max_tokens": 7}})
    # Assert
    assert cfg.registry == "/x/adapters" and cfg.port == 9000
    assert cfg.batching.max_batch_size == 4 and cfg.batching.batch_wait_timeout_s == 0.1
    assert cfg.limits.max_tokens == 7 and cfg.limits.max_prompt_tokens == 4096
    assert cfg.source == (str(path.resolve()), {"registry": "/x/adapters", "batching.batch_wait_timeout_s": 0.1,
                                                "limits": {"max_tokens": 7}})


def test_relative_paths_resolve_against_the_config_folder_when_they_exist(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "serve.yaml").write_text("registry: adapters\napi_keys_file: keys.yaml\n")
    cfg = load_serve_config(tmp_path / "serve.yaml")
    assert cfg.registry == str(tmp_path / "adapters")
    assert cfg.api_keys_file == "keys.yaml"  # not there: left relative to the working directory


@pytest.mark.parametrize("overrides, key", [
    ({"batching.max_batch_sise": 4}, "batching.max_batch_sise: unknown key"),
    ({"limits.max_tokens": 0}, "limits.max_tokens"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas must be <= max_replicas"),
    ({"rollouts": {"ab": [{"adapter": "../etc", "weight": 1}]}}, "invalid adapter name"),
    ({"rollouts": {"ab": [{"adapter": "a@v1", "weight": 0}]}}, "weight > 0"),
    ({"keys": [{"key": "short"}]}, "keys.0.key"),
    ({"keys": [{"name": "x"}]}, "exactly one of `key` or `sha256`"),
])
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        load_serve_config(None, overrides)
