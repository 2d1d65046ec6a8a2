"""`fineray data prepare`: clean a run's data and publish it as a versioned dataset.

Steps (in the order they decide), streamed record by record (chunks of `chunk` for batched tokenisation and signatures):
    1. parse (a malformed record fails with its file and line, or is skipped and counted: `on_error`)
    2. drop empty responses, and records outside [min_tokens, max_tokens]
    3. dedupe: `exact` drops records whose normalised text was seen before (in any split), `near` also drops
       records with a MinHash-LSH near duplicate among the kept ones
    4. drop training records that contain held-out text (n-gram leakage; held-out splits are read first)
    5. redact PII in every string field (placeholders per kind, `fineray.train.pii`); redaction happens
       first, so duplicates and leaks are judged on the text that is published
The records keep their keys (an alpaca record stays alpaca). The result is audited and published with
`publish_dataset` (manifest: what was removed, the audit summary, the sources).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fineray.train._textsig import LeakIndex, NearDupIndex, exact_key
from fineray.train.audit import AuditSettings, Source, TokenLengths, audit, record_texts
from fineray.train.data import DataError, iter_records, to_example
from fineray.train.datasets import publish_dataset
from fineray.train.pii import PII_KINDS, redact
from fineray.train.registry import AdapterVersion

__all__ = ["PrepareSettings", "prepare", "redact_record"]


@dataclass
class PrepareSettings:
    """What `prepare` does. `redact`: PII kinds to replace (empty: none); see the module doc for the rest."""

    dedupe: Literal["none", "exact", "near"] = "exact"
    redact: tuple[str, ...] = PII_KINDS
    min_tokens: int | None = None
    max_tokens: int | None = None
    drop_leaked: bool = True
    on_error: Literal["fail", "skip"] = "fail"
    near_threshold: float = 0.8
    ngram: int = 8
    min_overlap: float = 0.5
    chunk: int = 2048
    system_prompt: str | None = None


def redact_record(obj: Any, kinds: tuple[str, ...], counts: Counter) -> Any:
    """`obj` with PII replaced in every string inside it (dicts and lists walked); counts added to `counts`."""
    if isinstance(obj, str):
        out, found = redact(obj, kinds)
        counts.update(found)
        return out
    if isinstance(obj, dict):
        return {k: redact_record(v, kinds, counts) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_record(v, kinds, counts) for v in obj]
    return obj


class _Cleaner:
    """Shared state of one prepare run: the dedupe and leakage indexes, the counts of what was removed."""

    def __init__(self, st: PrepareSettings, tokenizer: Any):
        self.st = st
        self.seen: set[int] = set()
        self.near = NearDupIndex(st.near_threshold) if st.dedupe == "near" else None
        self.leak = LeakIndex(st.ngram, st.min_overlap)
        self.lengths = TokenLengths(tokenizer) if tokenizer is not None and (st.min_tokens or st.max_tokens) else None
        self.removed: Counter = Counter()
        self.redacted: Counter = Counter()
        self.done = 0

    def _chunks(self, split: str, sources: list[Source]) -> Iterator[list[tuple[dict, Any, Counter]]]:
        buf = []
        for src in sources:
            for rec, where in iter_records(src.path):
                try:
                    ex = to_example(rec, src.format, self.st.system_prompt)
                except DataError as e:
                    if self.st.on_error == "fail":
                        raise DataError(f"{where}: {e} (--on-error skip drops malformed records)") from None
                    self.removed[f"{split}:malformed"] += 1
                    continue
                found: Counter = Counter()
                if self.st.redact:  # first, so duplicates and leaks are judged on the text that is published
                    rec = redact_record(rec, self.st.redact, found)
                    ex = to_example(rec, src.format, self.st.system_prompt)
                buf.append((rec, ex, found))
                if len(buf) >= self.st.chunk:
                    yield buf
                    buf = []
        if buf:
            yield buf

    def records(self, split: str, sources: list[Source],
                on_progress: Callable[[int], None] | None) -> Iterator[dict[str, Any]]:
        for chunk in self._chunks(split, sources):
            texts = []
            for _, ex, _ in chunk:
                _, prompt, response = record_texts(ex)
                texts.append(f"{prompt}\n{response}")
            lens = self.lengths([ex for _, ex, _ in chunk]) if self.lengths else None
            sigs = self.near.signatures(texts) if self.near else None
            for i, (rec, ex, found) in enumerate(chunk):
                reason = self._reason(split, ex, texts[i], None if lens is None else int(lens[i]),
                                      None if sigs is None else sigs[i])
                if reason:
                    self.removed[f"{split}:{reason}"] += 1
                    continue
                self.redacted.update(found)
                yield rec
            self.done += len(chunk)
            if on_progress is not None:
                on_progress(self.done)

    def _reason(self, split: str, ex: Any, text: str, n_tokens: int | None, sig: Any) -> str | None:
        """Why a record is dropped (None: kept). Kept records enter the indexes."""
        st = self.st
        if not record_texts(ex)[2].strip():
            return "empty_response"
        if n_tokens is not None and ((st.max_tokens and n_tokens > st.max_tokens)
                                     or (st.min_tokens and n_tokens < st.min_tokens)):
            return "length"
        if st.dedupe != "none":
            key = exact_key(text)
            if key in self.seen:
                return "exact_duplicate"
            if self.near is not None and self.near.add(0, sig, insert=False):
                return "near_duplicate"
        if split == "train" and st.drop_leaked and len(self.leak) and self.leak.match(text):
            return "leaked"
        if st.dedupe != "none":
            self.seen.add(key)
            if self.near is not None:
                self.near.add(0, sig)
        if split != "train":
            self.leak.add(split, text)
        return None


def prepare(splits: dict[str, list[Source]], registry: str, name: str, settings: PrepareSettings | None = None,
            *, tokenizer: Any = None, audit_settings: AuditSettings | None = None,
            lineage: dict[str, Any] | None = None,
            on_progress: Callable[[int], None] | None = None) -> tuple[AdapterVersion, dict[str, Any]]:
    """Clean `splits` and publish them as the next version of dataset `name` in `registry`.

    Returns:
        (the published version, {"removed": {split:reason: n}, "redacted": {kind: n}}).

    Raises:
        DataError: a malformed record (with `on_error="fail"`), named by file and line.
        RegistryError: a bad name, or a split left without records.
    """
    st = settings or PrepareSettings()
    cleaner = _Cleaner(st, tokenizer)
    order = [n for n in splits if n != "train"] + (["train"] if "train" in splits else [])
    formats = {n: sorted({s.format for s in splits[n]}) for n in order}
    fields = {
        "format": {n: f[0] if len(f) == 1 else "auto" for n, f in formats.items()},
        "sources": {n: [s.path for s in splits[n]] for n in order},
        "prepare": {"dedupe": st.dedupe, "redact": list(st.redact), "min_tokens": st.min_tokens,
                    "max_tokens": st.max_tokens, "drop_leaked": st.drop_leaked,
                    # Filled while the records stream through, before the manifest is written.
                    "removed": cleaner.removed, "redacted": cleaner.redacted},
        "lineage": lineage or {},
    }
    aset = audit_settings or AuditSettings(max_seq_len=st.max_tokens or 512)

    def audit_staged(dirs: dict[str, str]) -> dict[str, Any]:
        fmt = fields["format"]
        return audit({s: [Source(d, fmt[s])] for s, d in dirs.items()}, aset, tokenizer=tokenizer)

    gens = {n: cleaner.records(n, splits[n], on_progress) for n in order}
    version = publish_dataset(registry, name, gens, fields, audit=audit_staged)
    return version, {"removed": dict(cleaner.removed), "redacted": dict(cleaner.redacted)}
