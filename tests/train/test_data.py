"""Data formats, auto-detection, malformed records, validation split and multi-task mixing."""

import json
from pathlib import Path

import pytest

from fineray.train.config import DataConfig
from fineray.train.data import DataError, detect_format, load_examples, load_train_val, to_example
from tests.conftest import write_jsonl


@pytest.mark.parametrize("record,fmt", [
    ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
    ({"prompt": "p", "completion": "c"}, "completion"),
    ({"text": "t"}, "text"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_every_format_normalises_to_the_same_conversation():
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert to_example({"instruction": "hi", "output": "yo"}, "auto").messages == expected
    assert to_example({"prompt": "hi", "completion": "yo"}, "auto").messages == expected
    assert to_example({"messages": expected}, "auto").messages == expected
    assert to_example({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                      "auto").messages == expected
    assert to_example({"text": "plain"}, "auto").text == "plain"


def test_alpaca_input_system_and_task_prefix():
    ex = to_example({"instruction": "Do", "input": "this", "output": "ok", "system": "S"}, "alpaca", task_prefix="t1")
    assert ex.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "[t1] Do\n\nthis"},
                           {"role": "assistant", "content": "ok"}]


def test_malformed_jsonl_line_is_named(tmp_path: Path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_examples(str(p))


def test_wrong_field_type_is_named_and_skip_counts(tmp_path: Path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": 5, "output": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'instruction' must be a string"):
        load_examples(str(p))
    stats: dict = {}
    exs = load_examples(str(p), on_error="skip", stats=stats)
    assert len(exs) == 1 and stats["skipped_malformed"] == 1


def test_csv_json_parquet_readers(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("prompt,completion\nhi,yo\nbye,ciao\n")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "c"}]))
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "d.parquet")
    assert [e.messages[1]["content"] for e in load_examples(str(tmp_path / "d.csv"))] == ["yo", "ciao"]
    assert load_examples(str(tmp_path / "d.csv"))[1].source.endswith("d.csv:3")
    assert [e.text for e in load_examples(str(tmp_path / "d.json"))] == ["a", "b", "c"]
    assert load_examples(str(tmp_path / "d.parquet"))[0].text == "x"


def test_missing_file_and_unreachable_hub():
    with pytest.raises(DataError, match="data file not found"):
        load_examples("nope/missing.jsonl")
    with pytest.raises(DataError, match="could not load dataset 'no-such-org/no-such-set'"):
        load_examples("no-such-org/no-such-set")


def test_validation_fraction_is_disjoint(alpaca_file: Path):
    stats: dict = {}
    train, val = load_train_val(DataConfig(train=str(alpaca_file), validation=0.25), seed=1, stats=stats)
    assert (len(train), len(val)) == (30, 10)
    assert not {e.source for e in train} & {e.source for e in val}
    assert stats["train_records"] == 30


def test_multitask_mix_follows_weights(tmp_path: Path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(30)])
    cfg = DataConfig(train=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], validation=None)
    train, _ = load_train_val(cfg, seed=0)
    n_a = sum(e.text.startswith("a") for e in train)
    assert len(train) == 60 and n_a == 45
