"""Data audit: what is in the training, validation and eval data before a GPU-hour is spent on it.

Per split: record counts, malformed records (file and line), token lengths against `data.max_seq_len`
(what training would drop), empty responses, exact duplicates (normalised hash), near duplicates (MinHash
LSH), PII by kind (`fineray.train.pii`), and outputs meant to be JSON that do not parse or whose keys differ
from the usual ones. Across splits: exact and near duplicates shared between splits and training records
that contain held-out text (word n-gram overlap): leakage.

Records stream through in chunks (`iter_records`), so memory grows with the indexes (see `_textsig`), not
with the data. `quick_check` is the cheap subset `fineray train` runs by default.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fineray.train._textsig import LeakIndex, NearDupIndex, exact_key
from fineray.train.config import RunConfig
from fineray.train.data import DataError, Example, iter_records, to_example
from fineray.train.pii import PII_KINDS, find_pii

__all__ = [
    "AuditSettings",
    "Source",
    "TokenLengths",
    "audit",
    "audit_run",
    "problems",
    "quick_check",
    "record_texts",
    "run_splits",
]

_BINS = 40  # token-length histogram bins


@dataclass(frozen=True)
class Source:
    """One data source of a split and the format its records are in."""

    path: str
    format: str = "auto"


@dataclass
class AuditSettings:
    """What to check and how.

    Attributes:
        max_seq_len: token limit of training (longer examples are dropped there).
        near / pii / lengths: run the near-duplicate, PII and token-length checks (the others are cheap).
        near_threshold / num_perm: Jaccard similarity of word 3-grams that counts as a near duplicate, and
            MinHash permutations (more: slower, more precise).
        ngram / min_overlap: a training record leaks a held-out record when it holds `min_overlap` of the
            held-out record's word `ngram`-grams.
        examples: locations kept per finding kind for the report.
        chunk: records processed together (signatures and tokenisation are batched).
    """

    max_seq_len: int = 512
    near: bool = True
    pii: bool = True
    lengths: bool = True
    near_threshold: float = 0.8
    num_perm: int = 64
    ngram: int = 8
    min_overlap: float = 0.5
    examples: int = 5
    chunk: int = 2048
    system_prompt: str | None = None


@dataclass
class _Split:
    name: str
    sources: list[str]
    records: int = 0
    malformed: int = 0
    empty_responses: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    over_max_seq_len: int = 0
    pii: Counter = field(default_factory=Counter)
    pii_records: int = 0
    json_like: int = 0
    json_invalid: int = 0
    json_keys: Counter = field(default_factory=Counter)
    lengths: list[np.ndarray] = field(default_factory=list)


def record_texts(ex: Example) -> tuple[str, str, str]:
    """(system, prompt, response) of an example: user turns joined, assistant turns joined."""
    if ex.text is not None:
        return "", "", ex.text
    msgs = ex.messages or []
    pick = lambda role: "\n".join(m["content"] for m in msgs if m["role"] == role)  # noqa: E731
    return pick("system"), pick("user"), pick("assistant")


def _last_response(ex: Example) -> str:
    if ex.text is not None:
        return ex.text
    return next((m["content"] for m in reversed(ex.messages or []) if m["role"] == "assistant"), "")


class TokenLengths:
    """Token lengths: content tokens batched through the fast tokenizer, plus the chat template's overhead
    per message measured exactly on the first examples (exact for text records)."""

    def __init__(self, tokenizer: Any):
        self.tok, self.per_msg, self.base = tokenizer, None, 0.0

    @staticmethod
    def _content(e: Example) -> str:
        return e.text if e.text is not None else "\n".join(m["content"] for m in e.messages or [])

    def _calibrate(self, exs: list[Example]) -> None:
        from fineray.train.templates import render_chat

        sample = [e for e in exs if e.messages][:32]
        if not sample:
            self.per_msg = 0.0
            return
        extra, msgs = 0.0, 0
        for e in sample:
            text, _ = render_chat(self.tok, e.messages)
            full = len(self.tok(text, add_special_tokens=False)["input_ids"])
            content = len(self.tok(self._content(e), add_special_tokens=False)["input_ids"])
            extra, msgs = extra + full - content, msgs + len(e.messages)
        self.per_msg = extra / msgs

    def __call__(self, exs: list[Example]) -> np.ndarray:
        if self.per_msg is None:
            self._calibrate(exs)
        texts = [self._content(e) for e in exs]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        out = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        turns = np.fromiter((len(e.messages) if e.messages else 0 for e in exs), dtype=np.int64, count=len(exs))
        eos = np.fromiter((1 if e.text is not None else 0 for e in exs), dtype=np.int64, count=len(exs))
        return out + np.rint(turns * self.per_msg).astype(np.int64) + eos


def _chunks(split: str, sources: list[Source], size: int, s: _Split, findings: dict[str, list],
            limit: int, settings: AuditSettings) -> Iterator[list[tuple[str, Example]]]:
    buf: list[tuple[str, Example]] = []
    for src in sources:
        for rec, where in iter_records(src.path):
            try:
                ex = to_example(rec, src.format, settings.system_prompt)
            except DataError as e:
                s.malformed += 1
                _keep(findings, "malformed", limit, {"split": split, "where": where, "error": str(e)})
                continue
            buf.append((where, ex))
            if len(buf) >= size:
                yield buf
                buf = []
    if buf:
        yield buf


def _keep(findings: dict[str, list], kind: str, limit: int, item: dict[str, Any]) -> None:
    rows = findings.setdefault(kind, [])
    if len(rows) < limit:
        rows.append(item)


def _mask(value: str) -> str:
    """A finding as shown in reports: enough to recognise, not enough to re-leak it."""
    return value[:2] + "\u2026" + (f"({len(value)} chars)" if len(value) > 4 else "")


def audit(splits: dict[str, list[Source]], settings: AuditSettings | None = None, *, tokenizer: Any = None,
          on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Audit data splits (`{"train": [...], "validation": [...], "eval": [...]}`); returns the report dict.

    Held-out splits are read first, so training records can be checked against them for leakage.

    Args:
        tokenizer: for token lengths; None skips the length check.
        on_progress: called with the number of records done after each chunk (progress bars).
    """
    st = settings or AuditSettings()
    t0 = time.perf_counter()
    order = [n for n in splits if n != "train"] + (["train"] if "train" in splits else [])
    exact: dict[int, int] = {}  # normalised-text key -> (split index << 40) | record index
    near = NearDupIndex(st.near_threshold, st.num_perm) if st.near else None
    leak = LeakIndex(st.ngram, st.min_overlap)
    lengths = TokenLengths(tokenizer) if tokenizer is not None and st.lengths else None
    findings: dict[str, list] = {}
    cross = Counter()
    stats: dict[str, _Split] = {}
    done = 0
    for si, name in enumerate(order):
        s = stats[name] = _Split(name, [src.path for src in splits[name]])
        for chunk in _chunks(name, splits[name], st.chunk, s, findings, st.examples, st):
            texts = []
            for _, ex in chunk:
                _, prompt, response = record_texts(ex)
                texts.append(f"{prompt}\n{response}")
            sigs = near.signatures(texts) if near else None
            if lengths is not None:
                lens = lengths([ex for _, ex in chunk])
                s.lengths.append(lens)
                for (where, _), n in zip(chunk, lens):
                    if n > st.max_seq_len:
                        s.over_max_seq_len += 1
                        _keep(findings, "over_max_seq_len", st.examples,
                              {"split": name, "where": where, "tokens": int(n)})
            for i, (where, ex) in enumerate(chunk):
                idx, key = s.records, (si << 40) | s.records
                s.records += 1
                system, prompt, response = record_texts(ex)
                _check_response(name, where, ex, response, s, findings, st.examples)
                if st.pii:
                    kinds = Counter()
                    for f in find_pii(f"{system}\n{prompt}\n{response}"):
                        kinds[f.kind] += 1
                        _keep(findings, f"pii_{f.kind}", st.examples, {"split": name, "where": where,
                                                                       "value": _mask(f.value)})
                    s.pii.update(kinds)
                    s.pii_records += bool(kinds)
                k = exact_key(texts[i])
                first = exact.get(k)
                if first is None:
                    exact[k] = key
                else:
                    other = order[first >> 40]
                    if other == name:
                        s.exact_duplicates += 1
                        _keep(findings, "exact_duplicates", st.examples,
                              {"split": name, "where": where, "duplicate_of": f"{other} record #{first & (2**40 - 1)}"})
                    else:
                        cross["exact"] += 1
                        _keep(findings, "leakage", st.examples, {"split": name, "where": where, "check": "exact",
                                                                 "other": f"{other} record #{first & (2**40 - 1)}"})
                if near is not None and sigs is not None:
                    hits = near.add(key, sigs[i])
                    if hits and first is None:
                        h = hits[0][0]
                        other = order[h >> 40]
                        if other == name:
                            s.near_duplicates += 1
                            _keep(findings, "near_duplicates", st.examples,
                                  {"split": name, "where": where, "similar_to": f"{other} record #{h & (2**40 - 1)}",
                                   "jaccard": round(hits[0][1], 2)})
                        else:
                            cross["near"] += 1
                            _keep(findings, "leakage", st.examples, {"split": name, "where": where, "check": "near",
                                                                     "other": f"{other} record #{h & (2**40 - 1)}"})
                if name != "train":
                    leak.add(f"{name} record #{idx}", texts[i])
                elif len(leak) and first is None:
                    m = leak.match(texts[i])
                    if m is not None:
                        cross["ngram"] += 1
                        _keep(findings, "leakage", st.examples,
                              {"split": name, "where": where, "check": f"{st.ngram}-gram overlap {m[1]:.2f}",
                               "other": m[0]})
            done += len(chunk)
            if on_progress is not None:
                on_progress(done)
    return _report(stats, order, cross, findings, st, time.perf_counter() - t0, lengths is not None)


def _check_response(split: str, where: str, ex: Example, response: str, s: _Split, findings: dict[str, list],
                    limit: int) -> None:
    if not response.strip():
        s.empty_responses += 1
        _keep(findings, "empty_responses", limit, {"split": split, "where": where})
    last = _last_response(ex).strip()
    if last[:1] in ("{", "["):
        s.json_like += 1
        try:
            obj = json.loads(last)
        except ValueError as e:
            s.json_invalid += 1
            _keep(findings, "invalid_json", limit, {"split": split, "where": where, "error": str(e)[:80]})
            return
        if isinstance(obj, dict):
            s.json_keys[tuple(sorted(obj))] += 1
            # Which records have unusual keys is only known at the end; keep candidates while they are few.
            _keep(findings, "_json_keys", 200, {"split": split, "where": where, "keys": sorted(obj)})


def _histogram(lengths: list[np.ndarray], max_seq_len: int) -> dict[str, Any]:
    arr = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    if not len(arr):
        return {}
    hi = max(int(arr.max()), max_seq_len) + 1
    counts, edges = np.histogram(arr, bins=_BINS, range=(0, hi))
    pct = np.percentile(arr, [50, 95, 99])
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 1), "p50": float(pct[0]), "p95": float(pct[1]),
            "p99": float(pct[2]), "max": int(arr.max()), "edges": [int(e) for e in edges], "counts": counts.tolist()}


def _report(stats: dict[str, _Split], order: list[str], cross: Counter, findings: dict[str, list],
            st: AuditSettings, wall: float, with_lengths: bool) -> dict[str, Any]:
    splits = {}
    key_rows = findings.pop("_json_keys", [])
    for name in order:
        s = stats[name]
        usual = s.json_keys.most_common(1)[0][0] if s.json_keys else None
        odd = sum(c for k, c in s.json_keys.items() if k != usual)
        for row in key_rows:
            if row["split"] == name and usual is not None and tuple(row["keys"]) != usual:
                _keep(findings, "json_key_mismatch", st.examples, row)
        # Responses are "meant to be JSON" when most of them look like JSON.
        json_expected = s.json_like * 2 > s.records
        splits[name] = {
            "sources": s.sources, "records": s.records, "malformed": s.malformed,
            "empty_responses": s.empty_responses, "exact_duplicates": s.exact_duplicates,
            "near_duplicates": s.near_duplicates if st.near else None,
            "over_max_seq_len": s.over_max_seq_len if with_lengths else None,
            "tokens": _histogram(s.lengths, st.max_seq_len) if with_lengths else None,
            "pii": {k: s.pii.get(k, 0) for k in PII_KINDS} if st.pii else None,
            "pii_records": s.pii_records if st.pii else None,
            "json": {"expected": json_expected, "invalid": s.json_invalid + (s.records - s.json_like if json_expected
                                                                             else 0),
                     "key_mismatch": odd, "usual_keys": list(usual) if usual else None},
        }
    leakage = {"exact": cross["exact"], "near": cross["near"] if st.near else None, "ngram": cross["ngram"]}
    records = sum(s.records for s in stats.values())
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: v for k, v in vars(st).items() if k != "system_prompt"},
        "splits": splits, "leakage": leakage,
        "totals": {"records": records, "leakage": sum(v or 0 for v in leakage.values()),
                   "pii": sum(sum((v["pii"] or {}).values()) for v in splits.values()),
                   "exact_duplicates": sum(v["exact_duplicates"] for v in splits.values()),
                   "near_duplicates": sum(v["near_duplicates"] or 0 for v in splits.values()),
                   "malformed": sum(v["malformed"] for v in splits.values())},
        "findings": findings, "wall_s": round(wall, 3), "records_per_s": round(records / wall, 1) if wall else None,
    }


def problems(report: dict[str, Any]) -> dict[str, int]:
    """What `--strict` fails on: leaked records and PII findings (non-zero counts only)."""
    t = report["totals"]
    return {k: t[k] for k in ("leakage", "pii") if t[k]}


def run_splits(cfg: RunConfig) -> dict[str, list[Source]]:
    """The splits of a run config: train sources, validation (a path), eval data."""
    d = cfg.data
    out = {"train": [Source(s.path, s.format or d.format) for s in d.sources()]}
    if isinstance(d.validation, str):
        out["validation"] = [Source(d.validation, d.format)]
    if cfg.eval.enabled and cfg.eval.data:
        out["eval"] = [Source(cfg.eval.data, d.format)]
    return out


def audit_run(cfg: RunConfig, settings: AuditSettings | None = None, *, tokenizer: Any = None,
              on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Audit a run config's data with its `max_seq_len` and system prompt."""
    st = settings or AuditSettings()
    st.max_seq_len, st.system_prompt = cfg.data.max_seq_len, cfg.data.system_prompt
    return audit(run_splits(cfg), st, tokenizer=tokenizer, on_progress=on_progress)


def quick_check(cfg: RunConfig, tokenizer: Any = None) -> tuple[dict[str, Any], str | None]:
    """The cheap checks `fineray train` runs first: exact duplicates, cross-split leakage, length overflow.

    Returns:
        (report, warning line or None when nothing was found).
    """
    rep = audit_run(cfg, AuditSettings(near=False, pii=False, lengths=tokenizer is not None), tokenizer=tokenizer)
    train = rep["splits"]["train"]
    parts = []
    if rep["totals"]["exact_duplicates"]:
        parts.append(f"{rep['totals']['exact_duplicates']} exact duplicates")
    if rep["totals"]["leakage"]:
        parts.append(f"{rep['totals']['leakage']} training records overlap validation/eval (leakage)")
    if train.get("over_max_seq_len"):
        parts.append(f"{train['over_max_seq_len']} training records over max_seq_len={cfg.data.max_seq_len} "
                     "(dropped)")
    if not parts:
        return rep, None
    return rep, ("data check: " + ", ".join(parts) + " - details: fineray data audit CONFIG "
                 "(off: --no-data-checks)")
