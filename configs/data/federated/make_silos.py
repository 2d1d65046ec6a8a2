"""Regenerates the demo silo files: a non-IID Dirichlet(alpha) split of `fineray:support-tickets` by issue.

    python configs/data/federated/make_silos.py [--alpha 0.5] [--silos acme,globex,initech] [--cap 200]

Each silo gets a label-skewed share of the 900 built-in tickets (the `issue` field of the JSON answer:
damaged | late | wrong_item | refund | defective), capped at `--cap` records to keep the demo quick.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from fineray.federated.split import dirichlet_split
from fineray.train.data import read_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--silos", default="acme,globex,initech")
    ap.add_argument("--cap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args()
    names = args.silos.split(",")
    records = [rec for rec, _ in read_records("fineray:support-tickets")]
    parts = dirichlet_split(records, len(names), args.alpha, lambda r: json.loads(r["output"])["issue"], args.seed)
    for name, part in zip(names, parts, strict=True):
        part = part[: args.cap]
        path = Path(args.out) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        labels = collections.Counter(json.loads(r["output"])["issue"] for r in part)
        print(f"{path}: {len(part)} records {dict(sorted(labels.items()))}")


if __name__ == "__main__":
    main()
