"""Audit reports for people and machines: a rich table, report.json, token-length PNGs and a self-contained
report.html (plots embedded as base64, no external assets)."""

from __future__ import annotations

import base64
import html
import itertools
import json
from pathlib import Path
from typing import Any

__all__ = ["ROWS", "print_audit", "write_audit"]

# (label, getter) of the per-split table rows; None values print as "-" (check not run).
ROWS: list[tuple[str, Any]] = [
    ("records", lambda s: s["records"]),
    ("malformed", lambda s: s["malformed"]),
    ("empty responses", lambda s: s["empty_responses"]),
    ("exact duplicates", lambda s: s["exact_duplicates"]),
    ("near duplicates", lambda s: s["near_duplicates"]),
    ("over max_seq_len", lambda s: s["over_max_seq_len"]),
    ("tokens p50 / p95 / max", lambda s: (f"{s['tokens']['p50']:.0f} / {s['tokens']['p95']:.0f} / "
                                          f"{s['tokens']['max']}") if s.get("tokens") else None),
    ("records with PII", lambda s: s["pii_records"]),
    ("PII findings", lambda s: ", ".join(f"{k} {v}" for k, v in s["pii"].items() if v) or 0
     if s["pii"] is not None else None),
    ("invalid JSON outputs", lambda s: s["json"]["invalid"] if s["json"]["expected"] or s["json"]["invalid"]
     else "n/a"),
    ("JSON key mismatches", lambda s: s["json"]["key_mismatch"] if s["json"]["expected"] else "n/a"),
]


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def _leak_line(report: dict[str, Any]) -> str:
    lk = report["leakage"]
    return (f"leakage across splits: {report['totals']['leakage']} records (exact {lk['exact']}, near "
            f"{_cell(lk['near'])}, n-gram {lk['ngram']})")


def print_audit(report: dict[str, Any], console: Any) -> None:
    """The per-split table, the leakage line and the first findings of each kind."""
    from rich.table import Table

    splits = report["splits"]
    t = Table(title="data audit")
    t.add_column("check")
    for name in splits:
        t.add_column(name, justify="right")
    for label, get in ROWS:
        t.add_row(label, *[_cell(get(s)) for s in splits.values()])
    console.print(t)
    console.print(_leak_line(report), highlight=False)
    for kind, rows in report["findings"].items():
        if rows:
            first = rows[0]
            detail = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("split", "where"))
            console.print(f"  {kind}: e.g. {first['where']} {detail}", highlight=False)
    console.print(f"{report['totals']['records']} records in {report['wall_s']:.1f} s "
                  f"({report['records_per_s']:.0f} records/s)", highlight=False)


def _plot(name: str, split: dict[str, Any], max_seq_len: int, out: Path) -> Path | None:
    tok = split.get("tokens")
    if not tok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = tok["edges"], tok["counts"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in itertools.pairwise(edges)], align="edge",
           color="#4C72B0", edgecolor="white")
    ax.axvline(max_seq_len, color="#C44E52", linestyle="--", label=f"max_seq_len={max_seq_len}")
    ax.set_xlabel("tokens per example (chat template included)")
    ax.set_ylabel("examples")
    ax.set_title(f"{name}: {split['records']} records, {_cell(split['over_max_seq_len'])} over the limit")
    ax.legend()
    fig.tight_layout()
    path = out / f"tokens-{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_audit(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, tokens-<split>.png and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    max_len = report["settings"]["max_seq_len"]
    pngs = {n: p for n, s in report["splits"].items() if (p := _plot(n, s, max_len, out)) is not None}
    paths.update({f"png_{n}": p for n, p in pngs.items()})
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in report["splits"])
    rows = "".join(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{esc(_cell(get(s)))}</td>"
                                                           for s in report["splits"].values()) + "</tr>"
                   for label, get in ROWS)
    findings = "".join(
        f"<h3>{esc(kind)} ({len(items)} shown)</h3><ul>" + "".join(
            f"<li><code>{esc(i['where'])}</code> " + esc(", ".join(f"{k}={v}" for k, v in i.items()
                                                                  if k not in ("split", "where"))) + "</li>"
            for i in items) + "</ul>"
        for kind, items in report["findings"].items() if items)
    imgs = "".join(f'<h3>{esc(n)}</h3><img alt="token lengths of {esc(n)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}">' for n, p in pngs.items())
    settings = esc(json.dumps(report["settings"]))
    paths["html"].write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>fineray data audit</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}td:first-child{text-align:left}"
        "</style></head><body><h1>fineray data audit</h1>"
        f"<p>{esc(report['created'])} &middot; {report['totals']['records']} records &middot; "
        f"{report['wall_s']:.1f} s</p><table><tr><th>check</th>{head}</tr>{rows}</table>"
        f"<p><b>{esc(_leak_line(report))}</b></p><h2>Token lengths</h2>{imgs or '<p>not measured</p>'}"
        f"<h2>Findings (first of each kind)</h2>{findings or '<p>none</p>'}"
        f"<h2>Settings</h2><pre>{settings}</pre></body></html>")
    return paths
