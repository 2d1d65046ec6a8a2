"""API keys from config, file and environment; 401s; key-file reloads; loopback-only binding without keys."""

from __future__ import annotations

import os

import pytest

from fineray.serve.api import refuse_remote
from fineray.serve.auth import ANONYMOUS, KeyStore, hash_key, parse_env_keys
from fineray.serve.config import load_serve_config
from fineray.serve.protocol import APIError
from fineray.serve.server import bind_host
from fineray.train.config import ConfigError


def test_keys_from_config_file_and_env(tmp_path):
    # Prepare
    keyfile = tmp_path / "keys.yaml"
    keyfile.write_text(f"keys:\n  - {{sha256: {hash_key('file-key-123')}, name: team-b, adapters: [beta]}}\n")
    cfg = load_serve_config(None, {"keys": [{"key": "inline-key-1", "name": "ops", "adapters": ["*"]}],
                                   "api_keys_file": str(keyfile)})
    # Execute
    store = KeyStore(cfg, environ={"FINERAY_API_KEYS": "env-key-0001:alpha,base;env-key-0002"})
    # Assert
    assert store.enabled
    assert store.authenticate("Bearer inline-key-1").allows("anything")
    team_b = store.authenticate("Bearer file-key-123")
    assert team_b.name == "team-b" and team_b.allows("beta@v2", "beta") and not team_b.allows("alpha", "alpha")
    env0 = store.authenticate("bearer env-key-0001")
    assert env0.allows("alpha", "alpha") and env0.allows("base") and not env0.allows("beta", "beta")
    assert store.authenticate("Bearer env-key-0002").allows("beta", "beta")


@pytest.mark.parametrize("header", [None, "", "Bearer wrong-key-000", "Basic inline-key-1", "inline-key-1"])
def test_missing_or_wrong_key_is_401(header):
    store = KeyStore(load_serve_config(None, {"keys": [{"key": "inline-key-1"}]}), environ={})
    with pytest.raises(APIError) as e:
        store.authenticate(header)
    assert e.value.status == 401 and e.value.code == "invalid_api_key"


def test_no_keys_means_anonymous_and_loopback_only():
    cfg = load_serve_config(None, {"host": "0.0.0.0"})
    store = KeyStore(cfg, environ={})
    assert not store.enabled and store.authenticate(None) is ANONYMOUS
    host, warning = bind_host(cfg, keys_enabled=False)
    assert host == "127.0.0.1" and "no API keys" in warning
    assert bind_host(cfg, keys_enabled=True) == ("0.0.0.0", None)
    assert bind_host(load_serve_config(None, {"host": "0.0.0.0", "insecure_no_auth": True}), False)[0] == "0.0.0.0"
    assert refuse_remote(False, False, "10.1.2.3") and not refuse_remote(False, False, "127.0.0.1")
    assert not refuse_remote(True, False, "10.1.2.3") and not refuse_remote(False, True, "10.1.2.3")


def test_key_file_changes_are_picked_up_and_broken_files_keep_old_keys(tmp_path):
    # Prepare
    keyfile = tmp_path / "keys.yaml"
    keyfile.write_text("keys: [{key: first-key-1}]\n")
    store = KeyStore(load_serve_config(None, {"api_keys_file": str(keyfile)}), environ={})
    assert store.authenticate("Bearer first-key-1")
    # Execute: rotate the key
    keyfile.write_text("keys: [{key: second-key-2}]\n")
    os.utime(keyfile, (1, 1))
    store.maybe_reload()
    # Assert
    assert store.authenticate("Bearer second-key-2")
    with pytest.raises(APIError):
        store.authenticate("Bearer first-key-1")
    keyfile.write_text("keys: [{key: x}]\n")  # too short: invalid
    os.utime(keyfile, (2, 2))
    store.maybe_reload()
    assert store.authenticate("Bearer second-key-2")


def test_bad_key_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="API key #0"):
        parse_env_keys("short")
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{key: long-enough-key, adapters: 3}]\n")
    with pytest.raises(ConfigError, match=r"keys\[0\].adapters"):
        KeyStore(load_serve_config(None, {"api_keys_file": str(bad)}), environ={})
