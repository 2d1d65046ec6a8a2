"""Reading training data: files and `datasets` names into normalised conversations.

Every record becomes an `Example`: either a list of chat messages (`role`/`content`) or raw text. Each
keeps `source` ("file:line") so a malformed record is reported where it is. Tokenisation and label masking
live in `templates.py`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fineray.train.config import DataConfig, DatasetSpec

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "Example",
    "detect_format",
    "iter_records",
    "load_examples",
    "load_train_val",
    "read_records",
    "to_example",
]

FORMATS = ("alpaca", "chat", "sharegpt", "completion", "text", "preference", "prompt")


class DataError(ValueError):
    """Bad training data; the message names the file and line (or record index)."""


@dataclass
class Example:
    """One normalised training example. A preference pair is a conversation ending in the chosen response,
    with the rejected response beside it (`rejected`); supervised objectives train on the chosen one."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None


def _builtin(name: str) -> Path:
    return Path(str(resources.files("fineray.train") / "builtin_data" / name))


# Datasets shipped inside the package, so the quickstart runs offline and on any cluster node.
BUILTIN_DATASETS: dict[str, str] = {
    "fineray:support-tickets": "support_tickets_train.jsonl",
    "fineray:support-tickets/train": "support_tickets_train.jsonl",
    "fineray:support-tickets/val": "support_tickets_val.jsonl",
    "fineray:support-tickets/test": "support_tickets_test.jsonl",
    "fineray:general-text": "general_text.jsonl",
    # preference pairs of the same tickets: the correct JSON answer over a corrupted one
    "fineray:support-pairs": "support_pairs_train.jsonl",
    "fineray:support-pairs/train": "support_pairs_train.jsonl",
    "fineray:support-pairs/val": "support_pairs_val.jsonl",
    "fineray:support-pairs/test": "support_pairs_test.jsonl",
}


def _resolve(path: str) -> Path | None:
    if path in BUILTIN_DATASETS:
        return _builtin(BUILTIN_DATASETS[path])
    if path.startswith("dataset:"):  # a versioned dataset in the registry (`fineray data prepare`)
        from fineray.train.datasets import resolve_dataset

        return resolve_dataset(path)
    if path.startswith("fineray:"):
        raise DataError(f"unknown built-in dataset {path!r}; known: {sorted(BUILTIN_DATASETS)}")
    p = Path(path).expanduser()
    if p.exists():
        return p
    repo = path.partition(":")[0]
    # "owner/name" (optionally ":split") without a file suffix is a `datasets` hub id; anything else is a file.
    if repo.count("/") == 1 and not p.suffix and not path.startswith((".", "/", "~")):
        return None
    raise DataError(f"data file not found: {path}")


def read_records(path: str) -> list[tuple[dict[str, Any], str]]:
    """Read raw records with their location ("file:line"): `list(iter_records(path))`."""
    return list(iter_records(path))


def iter_records(path: str, batch_rows: int = 8192) -> Iterator[tuple[dict[str, Any], str]]:
    """Stream raw records with their location ("file:line"), never holding a whole file (except .json arrays).

    Supports .jsonl, .json (array), .csv, .parquet, a folder of .parquet parts, built-in `fineray:` names,
    registry datasets (`dataset:NAME[@vN][/SPLIT]`) and `datasets` hub ids (`owner/name` or `owner/name:split`).
    A .jsonl line that is not JSON is yielded as `{"__error__": ...}` so callers can name it or skip it.

    Args:
        batch_rows: Parquet rows decoded at a time.

    Raises:
        DataError: missing file, unparsable .json, unreachable hub dataset.
    """
    p = _resolve(path)
    if p is None:
        yield from _read_hub(path)
        return
    parts = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if p.is_dir() and not parts:
        raise DataError(f"{p} is a directory; give a .jsonl, .json, .csv or .parquet file")
    suffix = p.suffix.lower() if p.is_file() else ".parquet"
    if suffix == ".jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:  # line by line: a line that is not UTF-8 is named (or skipped) like one that is not JSON
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield {"__error__": _not_utf8(e)}, f"{p}:{n}"
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__error__": f"invalid JSON ({e.msg} at column {e.colno})"}, f"{p}:{n}"
                    continue
                yield rec, f"{p}:{n}"
    elif suffix == ".json":
        try:
            data = json.loads(_read_text(p))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: a .json data file must hold a list of records")
        yield from ((rec, f"{p}[{i}]") for i, rec in enumerate(data))
    elif suffix == ".csv":
        text = _read_text(p)  # decoded whole: a quoted CSV field may span lines
        # Line numbers count the header as line 1, as a spreadsheet shows them.
        yield from ((dict(row), f"{p}:{i + 2}")
                    for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for part in parts:
            i = 0
            for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows):
                for rec in batch.to_pylist():  # a null cell is a key the record did not have
                    yield {k: v for k, v in rec.items() if v is not None}, f"{part}[row {i}]"
                    i += 1
    else:
        raise DataError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _not_utf8(e: UnicodeDecodeError, line_start: int = 0) -> str:
    byte = e.object[e.start:e.start + 1].hex()
    return (f"not UTF-8 text (byte 0x{byte} at column {e.start - line_start + 1}); save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)")


def _read_text(p: Path) -> str:
    """A whole file as UTF-8 text (a leading byte-order mark is dropped); DataError naming the line if not."""
    data = p.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{p}:{line}: {_not_utf8(e, line_start)}") from None


def _read_hub(name: str) -> list[tuple[dict[str, Any], str]]:
    repo, _, split = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "offline" / "not found"
        raise DataError(
            f"could not load dataset {name!r}: it is not a local file and the hub was not reachable or has no "
            f"such dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return [(dict(rec), f"{name}[{i}]") for i, rec in enumerate(ds)]


def detect_format(record: dict[str, Any]) -> str:
    """Guess a record's format from its keys."""
    if "chosen" in record and "rejected" in record:  # before `messages`: UltraFeedback rows carry both
        return "preference"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    if "prompt" in record:  # a prompt without an answer: RL prompts (GRPO)
        return "prompt"
    raise DataError(
        f"cannot detect the format from keys {sorted(record)}; expected one of messages | conversations | "
        "instruction+output | prompt+completion | text | chosen+rejected | prompt (or set data.format)"
    )


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant", "bot": "assistant"}


def _need_str(record: dict[str, Any], key: str) -> str:
    v = record.get(key)
    if not isinstance(v, str):
        raise DataError(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def to_example(record: dict[str, Any], fmt: str, system_prompt: str | None = None,
               task_prefix: str | None = None) -> Example:
    """Normalise one record of format `fmt` into an Example (raises DataError without location)."""
    if "__error__" in record:
        raise DataError(record["__error__"])
    if not isinstance(record, dict):
        raise DataError(f"a record must be an object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "text":
        return Example(text=_need_str(record, "text"))
    if fmt == "preference":
        from fineray.train.pairs import preference_example

        return preference_example(record, system_prompt, task_prefix)
    if fmt == "prompt":  # no response to learn from: the record's other columns go to the reward functions
        p = record.get("prompt")
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise DataError("field 'prompt' must be a string or a non-empty list of {role, content} messages")
        msgs = [dict(m) for m in msgs]
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return Example(messages=msgs, meta={"record": record})
    if fmt == "alpaca":
        instr, out = _need_str(record, "instruction"), _need_str(record, "output")
        inp = record.get("input") or ""
        if not isinstance(inp, str):
            raise DataError("field 'input' must be a string")
        user = f"{instr}\n\n{inp}" if inp else instr
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        system = record.get("system") or system_prompt
    elif fmt == "completion":
        msgs = [{"role": "user", "content": _need_str(record, "prompt")},
                {"role": "assistant", "content": _need_str(record, "completion")}]
        system = system_prompt
    elif fmt in ("chat", "sharegpt"):
        key, rk, ck = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"field {key!r} must be a non-empty list of turns")
        msgs, system = [], None
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get(rk), str) or not isinstance(t.get(ck), str):
                raise DataError(f"{key}[{i}] must have string fields {rk!r} and {ck!r}")
            role = t[rk] if fmt == "chat" else _SHAREGPT_ROLES.get(t[rk].lower())
            if role not in ("system", "user", "assistant"):
                raise DataError(f"{key}[{i}].{rk}: unknown role {t[rk]!r}")
            msgs.append({"role": role, "content": t[ck]})
        if msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
        system = system or system_prompt
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{key} has no assistant turn to learn from")
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if task_prefix:
        first_user = next(m for m in msgs if m["role"] == "user")
        first_user["content"] = f"[{task_prefix}] {first_user['content']}"
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return Example(messages=msgs)


def load_examples(path: str, fmt: str = "auto", on_error: str = "fail", system_prompt: str | None = None,
                  task_prefix: str | None = None, stats: dict[str, int] | None = None) -> list[Example]:
    """Read and normalise one data source.

    Args:
        on_error: `fail` raises on the first malformed record (naming file and line); `skip` drops it and
            counts it in `stats["skipped_malformed"]` (never silently).
    """
    out: list[Example] = []
    for rec, where in read_records(path):
        try:
            ex = to_example(rec, fmt, system_prompt, task_prefix)
        except DataError as e:
            if on_error == "fail":
                raise DataError(f"{where}: {e} (set data.on_error=skip to skip malformed records)") from None
            if stats is not None:
                stats["skipped_malformed"] = stats.get("skipped_malformed", 0) + 1
            continue
        ex.source = where
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no usable records")
    return out


def _mix(per_source: list[tuple[DatasetSpec, list[Example]]], rng: random.Random) -> list[Example]:
    """Mix sources by weight: the mix keeps the total size, source i gets a weight_i share (with repeats)."""
    if len(per_source) == 1:
        return list(per_source[0][1])
    total = sum(len(ex) for _, ex in per_source)
    wsum = sum(s.weight for s, _ in per_source)
    out: list[Example] = []
    for spec, exs in per_source:
        k = max(1, round(total * spec.weight / wsum))
        if k <= len(exs):
            out.extend(rng.sample(exs, k))
        else:
            out.extend(exs * (k // len(exs)) + rng.sample(exs, k % len(exs)))
    rng.shuffle(out)
    return out


def load_train_val(cfg: DataConfig, seed: int = 42,
                   stats: dict[str, int] | None = None) -> tuple[list[Example], list[Example]]:
    """Training and validation examples for a DataConfig (validation from a file or a held-out fraction)."""
    rng = random.Random(seed)
    stats = stats if stats is not None else {}
    per_source = []
    for spec in cfg.sources():
        exs = load_examples(spec.path, spec.format or cfg.format, cfg.on_error, cfg.system_prompt,
                            spec.task_prefix, stats)
        per_source.append((spec, exs))
    if isinstance(cfg.validation, str):
        val = load_examples(cfg.validation, cfg.format, cfg.on_error, cfg.system_prompt, None, stats)
        train = _mix(per_source, rng)
    elif isinstance(cfg.validation, float):
        # Hold out per source before mixing, so repeats of an example never land on both sides.
        val, kept = [], []
        for spec, exs in per_source:
            exs = list(exs)
            rng.shuffle(exs)
            n_val = max(1, int(len(exs) * cfg.validation)) if len(exs) > 1 else 0
            val.extend(exs[:n_val])
            kept.append((spec, exs[n_val:]))
        train = _mix(kept, rng)
    else:
        val, train = [], _mix(per_source, rng)
    stats["train_records"], stats["val_records"] = len(train), len(val)
    return train, val
