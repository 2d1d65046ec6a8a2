"""`fineray data audit|prepare|list|show` as a user runs them (in-process through typer's runner: the same
commands, options and exit codes, without a Python start per call; no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.runner import invoke as run
from tests.conftest import write_jsonl


def _files(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"Order {i} is late, what now?", "completion": f"We re-sent order {i}."} for i in range(30)]
    train = write_jsonl(tmp_path / "train.jsonl", rows + rows[:2] + [{"prompt": "mail me: ann@example.org",
                                                                       "completion": "Done."}])
    return train, write_jsonl(tmp_path / "eval.jsonl", rows[5:8] + [{"prompt": "new", "completion": "fresh"}])


def test_audit_prints_the_table_writes_reports_and_strict_fails(tmp_path: Path):
    train, ev = _files(tmp_path)
    # Execute
    p = run("data", "audit", str(train), "--eval", str(ev), "--no-lengths", "--out", "rep", "--no-progress",
            cwd=tmp_path, check=False)
    strict = run("data", "audit", str(train), "--eval", str(ev), "--no-lengths", "--out", "rep", "--strict",
                 "--no-progress", cwd=tmp_path, check=False)
    # Assert
    assert p.returncode == 0, p.stderr
    assert "data audit" in p.stdout and "exact duplicates" in p.stdout and "email 1" in p.stdout
    assert "leakage across splits: 3 records" in p.stdout
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["splits"]["train"]["exact_duplicates"] == 2 and report["totals"]["leakage"] == 3
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "leakage across splits" in html and "<script" not in html
    assert strict.returncode == 1 and "--strict: leakage 3, pii 1" in strict.stderr


def test_prepare_publishes_and_list_show_read_it(tmp_path: Path):
    train, ev = _files(tmp_path)
    p = run("data", "prepare", str(train), "--eval", str(ev), "--name", "orders", "--registry", "reg",
            "--dedupe", "near", "--no-progress", cwd=tmp_path)
    assert "published dataset:orders@v1" in p.stdout and "redacted: email 1" in p.stdout
    listing = run("data", "list", "--registry", "reg", cwd=tmp_path).stdout
    assert "dataset:orders@v1" in listing and "train 28" in listing and "eval 4" in listing
    shown = json.loads(run("data", "show", "dataset:orders", "--registry", "reg", cwd=tmp_path).stdout)
    assert shown["prepare"]["removed"] == {"train:exact_duplicate": 5} and shown["audit"]["totals"]["pii"] == 0


def test_bad_input_files_are_named_with_their_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n')
    p = run("data", "prepare", str(bad), "--name", "x", "--registry", "reg", "--no-progress", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and f"{bad}:2: invalid JSON" in p.stderr
    p = run("data", "audit", str(bad), "--no-lengths", "--out", "rep", "--no-progress", cwd=tmp_path)
    assert "malformed" in p.stdout and f"{bad}:2" in p.stdout.replace("\n", "")
    p = run("data", "audit", "missing.jsonl", "--no-lengths", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "data file not found: missing.jsonl" in p.stderr
    p = run("data", "prepare", str(bad), "--name", "x", "--dedupe", "fuzzy", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "--dedupe is none | exact | near" in p.stderr
