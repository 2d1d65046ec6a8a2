"""Audit throughput: `fineray data audit` checks on a synthetic file of N support tickets (default 1M).

The file is generated (seeded) in a temporary folder and deleted afterwards; nothing large is committed.
Planted: 1 % exact duplicates (case/spacing changed), 1 % near duplicates (one word changed), 0.5 % e-mail
addresses, 0.5 % phone numbers, plus a 2,000-record eval split of which 1 % are copies of training records.
Prints one JSON line: records/s (wall and per CPU second: on a shared machine the first is lower), peak RSS of
this process, and what the audit found.

Usage: python bench/audit_throughput.py [--records 1000000] [--no-near] [--no-lengths] [--no-pii]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_support_tickets import make


def write_data(folder: Path, n: int, seed: int = 1) -> tuple[Path, Path]:
    rng = random.Random(seed)
    train, kept = folder / "train.jsonl", []
    with train.open("w") as f:
        for i in range(n):
            rec = make(rng)
            rec["input"] += f" Ref {i}."  # tickets are templated: a serial keeps them distinct
            roll = rng.random()
            if roll < 0.01 and kept:
                rec = dict(rng.choice(kept))
                rec["input"] = "  " + rec["input"].upper()
            elif roll < 0.02 and kept:
                rec = dict(rng.choice(kept))
                words = rec["input"].split()
                words[rng.randrange(len(words))] = "changed"
                rec["input"] = " ".join(words)
            elif roll < 0.025:
                rec["input"] += f" Mail me at user{i}@example.com."
            elif roll < 0.03:
                rec["input"] += f" Call +44 20 7946 {i % 10000:04d}."
            if len(kept) < 10_000:
                kept.append(rec)
            f.write(json.dumps(rec) + "\n")
    ev = folder / "eval.jsonl"
    with ev.open("w") as f:
        for i in range(2000):
            f.write(json.dumps(rng.choice(kept) if i % 100 == 0 else make(rng)) + "\n")
    return train, ev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--no-near", action="store_true")
    ap.add_argument("--no-lengths", action="store_true")
    ap.add_argument("--no-pii", action="store_true")
    args = ap.parse_args()
    from fineray.train.audit import AuditSettings, Source, audit
    from fineray.train.config import EMBEDDED_MODEL, ModelConfig
    from fineray.train.model import load_tokenizer, resolve_base

    with tempfile.TemporaryDirectory(prefix="fineray-audit-bench-") as tmp:
        t0 = time.perf_counter()
        train, ev = write_data(Path(tmp), args.records)
        gen_s = time.perf_counter() - t0
        tok = None if args.no_lengths else load_tokenizer(ModelConfig(), resolve_base(EMBEDDED_MODEL))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu0 = time.process_time()
        st = AuditSettings(max_seq_len=256, near=not args.no_near, pii=not args.no_pii, lengths=not args.no_lengths)
        rep = audit({"train": [Source(str(train), "alpaca")], "eval": [Source(str(ev), "alpaca")]}, st, tokenizer=tok)
        cpu_s = time.process_time() - cpu0  # this process's CPU time: on a shared machine wall time is longer
        size_mb = train.stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tr = rep["splits"]["train"]
    print(json.dumps({
        "records": rep["totals"]["records"], "file_mb": round(size_mb, 1), "wall_s": rep["wall_s"],
        "records_per_s": rep["records_per_s"], "cpu_s": round(cpu_s, 1),
        "records_per_cpu_s": round(rep["totals"]["records"] / cpu_s, 1), "peak_rss_mb": round(peak), "rss_before_audit_mb": round(rss_before),
        "generate_s": round(gen_s, 1), "checks": {"near": st.near, "pii": st.pii, "lengths": st.lengths},
        "found": {"exact_duplicates": tr["exact_duplicates"], "near_duplicates": tr["near_duplicates"],
                  "leakage": rep["leakage"], "pii": {k: v for k, v in (tr["pii"] or {}).items() if v},
                  "over_max_seq_len": tr["over_max_seq_len"]},
    }))


if __name__ == "__main__":
    main()
