"""The data audit on planted problems: exact and near duplicates (recall, no false hits), leakage between
splits, malformed records named by file and line, JSON outputs, token lengths, and train's quick check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fineray.train.audit import AuditSettings, Source, audit, quick_check
from fineray.train.config import load_config
from tests.conftest import write_jsonl

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta", "vu", "we") for b in range(200)]


def _sentence(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _record(prompt: str, answer: str) -> dict:
    return {"instruction": "Summarise the note.", "input": prompt, "output": answer}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """300 distinct records, then 30 exact copies (case and spacing changed) and 30 near copies (one word of
    60 changed) of records among them; held-out files with 10 copies of training records."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("planted")
    distinct = [_record(_sentence(rng), _sentence(rng, 10)) for _ in range(300)]
    exact = [_record("  " + r["input"].upper() + " ", r["output"]) for r in rng.sample(distinct, 30)]
    near = []
    for r in rng.sample(distinct, 30):
        words = r["input"].split()
        words[rng.randrange(20, 40)] = "zzchanged"
        near.append(_record(" ".join(words), r["output"]))
    train = distinct + exact + near
    rng.shuffle(train)
    fresh = [_record(_sentence(rng), _sentence(rng, 10)) for _ in range(40)]
    leaked = rng.sample(distinct, 10)
    return {"train": write_jsonl(root / "train.jsonl", train), "exact": exact, "near": near, "distinct": distinct,
            "clean_eval": write_jsonl(root / "clean_eval.jsonl", fresh),
            "leaky_eval": write_jsonl(root / "leaky_eval.jsonl", fresh + leaked), "leaked": leaked}


def test_planted_exact_and_near_duplicates_are_found(planted):
    # Execute
    rep = audit({"train": [Source(str(planted["train"]))]}, AuditSettings(examples=100))
    # Assert: recall >= 0.95 on the planted sets, nothing flagged among the distinct records
    train = rep["splits"]["train"]
    assert train["records"] == 360
    assert train["exact_duplicates"] == 30
    assert 0.95 * 30 <= train["near_duplicates"] <= 30
    lines = Path(planted["train"]).read_text().splitlines()
    flagged = {json.loads(lines[int(f["where"].rsplit(":", 1)[1]) - 1])["input"]
               for f in rep["findings"]["near_duplicates"]}
    # Whichever of a planted pair comes second is flagged; no record outside the planted pairs is.
    pairs = {r["input"] for r in planted["near"]}
    pairs |= {d["input"] for d in planted["distinct"]
              if any(sum(a != b for a, b in zip(d["input"].split(), n["input"].split())) == 1 for n in planted["near"])}
    assert flagged <= pairs


def test_distinct_records_have_no_duplicates_and_no_leakage(planted, tmp_path):
    distinct = write_jsonl(tmp_path / "distinct.jsonl", planted["distinct"])
    rep = audit({"train": [Source(str(distinct))], "eval": [Source(str(planted["clean_eval"]))]})
    assert rep["totals"]["exact_duplicates"] == rep["totals"]["near_duplicates"] == rep["totals"]["leakage"] == 0


def test_planted_leakage_between_train_and_eval_is_found(planted):
    rep = audit({"train": [Source(str(planted["train"]))], "eval": [Source(str(planted["leaky_eval"]))]},
                AuditSettings(near=False, examples=100))
    # Every eval record copied from train is a cross-split duplicate; train copies of it show as leakage.
    leaked = rep["leakage"]["exact"] + rep["leakage"]["ngram"]
    assert leaked >= 10
    assert all(f["check"] == "exact" or f["check"].startswith("8-gram overlap") for f in rep["findings"]["leakage"])
    assert {f["other"].split(" ")[0] for f in rep["findings"]["leakage"]} == {"eval"}


def test_ngram_leakage_catches_a_held_out_text_inside_a_longer_record(tmp_path):
    rng = random.Random(3)
    held = [_record(_sentence(rng, 30), "yes") for _ in range(20)]
    train = [_record(_sentence(rng) + " " + held[4]["input"] + " " + _sentence(rng, 20), "no")] + \
            [_record(_sentence(rng), "no") for _ in range(50)]
    rep = audit({"train": [Source(str(write_jsonl(tmp_path / "t.jsonl", train)))],
                 "validation": [Source(str(write_jsonl(tmp_path / "v.jsonl", held)))]}, AuditSettings(near=False))
    assert rep["leakage"]["ngram"] == 1
    assert rep["findings"]["leakage"][0]["where"].endswith("t.jsonl:1")
    assert rep["findings"]["leakage"][0]["other"] == "validation record #4"


def test_malformed_records_are_named_by_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n\n{"prompt": 3, "completion": "x"}\n')
    rep = audit({"train": [Source(str(p), "completion")]}, AuditSettings(near=False, pii=False))
    bad = rep["findings"]["malformed"]
    assert rep["splits"]["train"]["malformed"] == 2
    assert bad[0]["where"] == f"{p}:2" and "invalid JSON" in bad[0]["error"]
    assert bad[1]["where"] == f"{p}:4" and "'prompt' must be a string" in bad[1]["error"]


def test_json_outputs_empty_responses_pii_and_lengths(tmp_path, tiny_tok):
    rows = [{"prompt": f"ticket {i}", "completion": json.dumps({"product": "x", "urgency": "low"})} for i in range(8)]
    rows += [{"prompt": "broken", "completion": '{"product": "x", "urgency": '},
             {"prompt": "odd keys", "completion": '{"product": "x", "priority": "low"}'},
             {"prompt": "empty", "completion": "   "},
             {"prompt": "mail a@b.io " + "word " * 300, "completion": "{}"}]
    p = write_jsonl(tmp_path / "j.jsonl", rows)
    rep = audit({"train": [Source(str(p))]}, AuditSettings(max_seq_len=64, near=False), tokenizer=tiny_tok)
    s = rep["splits"]["train"]
    assert s["json"]["expected"] and s["json"]["invalid"] == 2  # the broken one and the empty (not JSON) one
    assert s["json"]["key_mismatch"] == 2 and s["json"]["usual_keys"] == ["product", "urgency"]
    assert s["empty_responses"] == 1 and s["pii"]["email"] == 1 and s["pii_records"] == 1
    assert s["over_max_seq_len"] == 1 and s["tokens"]["max"] > 300 and sum(s["tokens"]["counts"]) == 12


def test_quick_check_warns_with_counts(tmp_path, alpaca_file, tiny_tok):
    rows = [json.loads(x) for x in alpaca_file.read_text().splitlines()]
    train = write_jsonl(tmp_path / "train.jsonl", rows + rows[:3])
    held = write_jsonl(tmp_path / "val.jsonl", rows[10:12])
    cfg = load_config(None, [f"data.train={train}", f"data.validation={held}", "eval.data=null", "model.base=tiny:llama"])
    rep, warning = quick_check(cfg, tiny_tok)
    assert rep["totals"]["exact_duplicates"] == 3 and rep["totals"]["leakage"] == 2
    assert warning.startswith("data check: 3 exact duplicates, 2 training records overlap") and "--no-data-checks" in warning
    clean = load_config(None, [f"data.train={alpaca_file}", "data.validation=0.1", "eval.data=null"])
    assert quick_check(clean)[1] is None
