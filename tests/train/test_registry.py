"""Adapter registry: versions, manifests with sha256, atomic publish, names, removal."""

import hashlib
import json
from pathlib import Path

import pytest

from fineray.train.registry import AdapterRegistry, RegistryError, parse_ref, sha256_file, validate_name


def _adapter(tmp_path: Path, content: bytes = b"weights") -> Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_bytes(content)
    return d


def test_register_versions_and_manifest(tmp_path: Path):
    reg = AdapterRegistry(str(tmp_path / "reg"))
    src = _adapter(tmp_path)
    v1 = reg.register("support-json", src, base_model="tiny:llama", method="lora",
                      hyperparameters={"lr": 1e-3}, dataset_fingerprint="abc", metrics={"val_loss": 1.5})
    v2 = reg.register("support-json", _adapter(tmp_path, b"other"), base_model="tiny:llama", method="lora")
    assert (v1.ref, v2.ref) == ("support-json@v1", "support-json@v2")
    assert reg.get("support-json").version == 2 and reg.get("support-json@v1").version == 1
    m = reg.get("support-json@1").manifest
    assert m["files"]["adapter_model.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    assert reg.get("support-json@v2").manifest["files"]["adapter_model.safetensors"] == sha256_file(
        src / "adapter_model.safetensors")
    assert m["hyperparameters"] == {"lr": 1e-3} and m["metrics"] == {"val_loss": 1.5}
    assert m["base_model"] == "tiny:llama" and m["dataset_fingerprint"] == "abc" and m["created"].endswith("Z")
    assert reg.verify("support-json@v1") == []
    assert [v.ref for v in reg.list()] == ["support-json@v1", "support-json@v2"]


def test_tampered_file_fails_verify(tmp_path: Path):
    reg = AdapterRegistry(str(tmp_path / "reg"))
    reg.register("a", _adapter(tmp_path), base_model="b", method="lora")
    (reg.local_path("a") / "adapter_model.safetensors").write_bytes(b"tampered")
    assert reg.verify("a") == ["adapter_model.safetensors"]


def test_unpublished_stage_is_invisible(tmp_path: Path):
    reg = AdapterRegistry(str(tmp_path / "reg"))
    (tmp_path / "reg" / "x" / ".stage-123").mkdir(parents=True)
    (tmp_path / "reg" / "x" / "v1").mkdir()  # a crashed writer: files but no manifest, so not a version
    (tmp_path / "reg" / "x" / "v1" / "adapter_model.safetensors").write_bytes(b"partial")
    assert reg.list() == []
    with pytest.raises(RegistryError, match="no adapter named 'x'"):
        reg.get("x")
    v = reg.register("x", _adapter(tmp_path), base_model="b", method="lora")
    assert v.version == 2  # never overwrites what is there


def test_remove_and_errors(tmp_path: Path):
    reg = AdapterRegistry(str(tmp_path / "reg"))
    for _ in range(2):
        reg.register("a", _adapter(tmp_path), base_model="b", method="lora")
    assert [v.ref for v in reg.remove("a@v1")] == ["a@v1"]
    assert [v.version for v in reg.versions("a")] == [2]
    with pytest.raises(RegistryError, match="has no version 7"):
        reg.get("a@v7")
    reg.remove("a")
    assert reg.names() == [] or reg.versions("a") == []


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_invalid_names(bad):
    with pytest.raises(RegistryError, match="invalid adapter name"):
        validate_name(bad)


def test_parse_ref():
    assert parse_ref("a") == ("a", None) and parse_ref("a@v3") == ("a", 3) and parse_ref("a@3") == ("a", 3)
    with pytest.raises(RegistryError):
        parse_ref("a@latest")
