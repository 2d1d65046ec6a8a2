"""fineray.base.runs: default run names per kind, their stems and registry names, the run kinds."""

from __future__ import annotations

from datetime import datetime

import pytest

from fineray.base import runs

NOW = datetime(2026, 12, 5, 9, 8, 7)


@pytest.mark.parametrize(("kind", "kwargs", "expected"), [
    ("train", {"model": "embedded:smollm2-135m-instruct", "method": "lora"}, "smollm2-135m-instruct-lora-20261205-090807"),
    ("rl", {"model": "hf:org/Model-1B/", "method": "qlora"}, "Model-1B-qlora-20261205-090807"),
    ("tune", {}, "sweep-20261205-090807"),
    ("federated", {"strategy": "fedex_lora"}, "federated-fedex-lora-20261205-090807"),
])
def test_default_run_names_per_kind(kind: str, kwargs: dict, expected: str) -> None:
    # Execute / Assert
    assert runs.default_run_name(kind, now=NOW, **kwargs) == expected


def test_registry_names_drop_the_timestamp_and_fall_back_to_a_default() -> None:
    # Execute / Assert: repeated runs register as versions of one name
    assert runs.registry_name("tiny-lora-20261205-090807", "adapter") == "tiny-lora"
    assert runs.registry_name("20261205-090807", "adapter") == "adapter"
    assert runs.registry_name(None, "federated") == "federated"
    assert runs.registry_name("x" * 100, "adapter") == "x" * 64
    assert runs.run_stem("sweep-20261205-090807") == "sweep" and runs.run_stem("v2-1") == "v2-1"


def test_unknown_kind_is_refused_naming_the_kinds() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="kind must be one of train, tune, federated, rl; got 'serve'"):
        runs.default_run_name("serve")
