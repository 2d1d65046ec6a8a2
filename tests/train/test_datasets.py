"""Versioned datasets: prepare (dedupe, redact, leakage, length), a registry round trip with hashes verified,
and `dataset:` references resolving wherever a data path does (train included)."""

from __future__ import annotations

import pytest

from fineray.train.audit import Source
from fineray.train.config import load_config
from fineray.train.data import DataError, load_examples, load_train_val
from fineray.train.datasets import DatasetRegistry, parse_dataset_ref, pin_dataset_refs, resolve_dataset
from fineray.train.prepare import PrepareSettings, prepare
from fineray.train.registry import AdapterRegistry, RegistryError
from tests.conftest import write_jsonl


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 7}.", "input": "", "output": f"The sum of {i} and {i + 7} is {2 * i + 7}."}
            for i in range(start, start + n)]


@pytest.fixture
def published(tmp_path):
    train = _rows(40) + _rows(3) + [{"instruction": "Mail maria@example.com the invoice", "input": "",
                                     "output": "Sent to maria@example.com."}] + _rows(2, start=100)
    val = _rows(2, start=100) + _rows(5, start=200)
    splits = {"train": [Source(str(write_jsonl(tmp_path / "train.jsonl", train)), "alpaca")],
              "validation": [Source(str(write_jsonl(tmp_path / "val.jsonl", val)), "alpaca")]}
    version, stats = prepare(splits, str(tmp_path / "reg"), "sums", PrepareSettings(dedupe="near"))
    return tmp_path / "reg", version, stats


def test_prepare_dedupes_redacts_drops_leaks_and_publishes_a_verified_version(published):
    root, v, stats = published
    # Assert: 3 repeats and the 2 records equal to validation records are gone; the email is redacted
    assert v.ref == "sums@v1" and v.manifest["kind"] == "dataset"
    assert stats["removed"] == {"train:exact_duplicate": 5}
    assert stats["redacted"] == {"email": 2}
    assert v.manifest["splits"] == {"validation": {"records": 7}, "train": {"records": 41}}
    assert v.manifest["prepare"]["removed"] == {"train:exact_duplicate": 5}
    assert v.manifest["audit"]["totals"]["pii"] == 0 and v.manifest["audit"]["totals"]["leakage"] == 0
    assert v.manifest["format"] == {"validation": "alpaca", "train": "alpaca"}
    reg = DatasetRegistry(str(root))
    assert reg.verify("sums@v1") == [] and set(v.manifest["files"]) == {"train/part-00000.parquet",
                                                                         "validation/part-00000.parquet"}
    exs = load_examples("dataset:" + str(root) + "/sums@v1", "alpaca")
    assert len(exs) == 41 and any("<EMAIL>" in e.messages[0]["content"] for e in exs)
    assert exs[0].source.endswith("train/part-00000.parquet[row 0]")
    assert len(load_examples(f"dataset:{root}/sums:validation")) == 7
    # Datasets live beside adapters without showing up as adapters.
    assert AdapterRegistry(str(root)).names() == []


def test_a_changed_file_fails_verification_and_versions_are_immutable(published):
    root, _, _ = published
    part = root / "_datasets" / "sums" / "v1" / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    reg = DatasetRegistry(str(root))
    assert reg.verify("sums@v1") == ["train/part-00000.parquet"]
    v2 = reg.publish("sums", root / "_datasets" / "sums" / "v1", {"kind": "dataset", "splits": {}})
    assert v2.version == 2 and [x.version for x in reg.versions("sums")] == [1, 2]


def test_dataset_refs_parse_and_fail_clearly(published, monkeypatch):
    root, _, _ = published
    r = parse_dataset_ref("dataset:s3://bucket/reg/tickets@v3:validation")
    assert (r.root, r.name, r.version, r.split) == ("s3://bucket/reg", "tickets", 3, "validation")
    assert parse_dataset_ref("dataset:tickets").text(root="/r", version=2) == "dataset:/r/tickets@v2"
    with pytest.raises(RegistryError, match="invalid dataset reference"):
        parse_dataset_ref("dataset:tickets@latest")
    monkeypatch.setenv("FINERAY_REGISTRY", str(root))
    assert resolve_dataset("dataset:sums").name == "train"
    with pytest.raises(RegistryError, match="has no split 'eval'"):
        resolve_dataset("dataset:sums:eval")
    with pytest.raises(RegistryError, match="dataset 'sums' has no version 9"):
        load_examples("dataset:sums@v9")
    with pytest.raises(RegistryError, match="no dataset named 'nope'"):
        load_examples("dataset:nope")


def test_dataset_refs_resolve_in_train_and_are_pinned(published):
    root, _, _ = published
    cfg = load_config(None, ["data.train=dataset:sums", "data.validation=dataset:sums:validation",
                             "data.format=alpaca", f"output.registry={root}", "eval.data=dataset:sums@v1:validation"])
    # Execute
    pinned = pin_dataset_refs(cfg)
    train, val = load_train_val(cfg.data)
    # Assert
    assert pinned == ["sums@v1", "sums@v1:validation", "sums@v1:validation"]
    assert cfg.data.train == f"dataset:{root}/sums@v1" and cfg.eval.data == f"dataset:{root}/sums@v1:validation"
    assert len(train) == 41 and len(val) == 7


def test_prepare_names_a_malformed_record_by_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    with pytest.raises(DataError, match=rf"{p}:2: field 'completion' must be a string"):
        prepare({"train": [Source(str(p))]}, str(tmp_path / "reg"), "bad")
    v, stats = prepare({"train": [Source(str(p))]}, str(tmp_path / "reg"), "bad", PrepareSettings(on_error="skip"))
    assert stats["removed"] == {"train:malformed": 1} and v.manifest["splits"]["train"]["records"] == 1
