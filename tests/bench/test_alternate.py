"""The alternating-runs summary: medians, ratios of medians and per-round ratios (bench/alternate.py)."""

from __future__ import annotations

from alternate import summary


def _row(side: str, rnd: int, tps: float, peak: float) -> dict:
    return {"side": side, "case": "8b-real4-long", "round": rnd, "tokens_per_s": tps, "mfu": tps / 1e5,
            "peak_alloc_gib": peak, "seconds": 10.0, "steps_timed": 30}


def test_summary_reports_median_ratios_and_the_worst_round() -> None:
    # Prepare: three rounds; fineray's round 2 is its slow one
    rows = [_row("baseline", r, t, 84.0) for r, t in ((1, 2600), (2, 2700), (3, 2800))]
    rows += [_row("strong", r, t, 40.0) for r, t in ((1, 6000), (2, 6100), (3, 5900))]
    rows += [_row("fineray", r, t, 34.0) for r, t in ((1, 11000), (2, 10000), (3, 11500))]
    rows.append({"side": "strong", "case": "8b-real4-long", "round": 1, "error": "RuntimeError: boom"})

    # Execute
    text = summary(rows)

    # Assert: median 11,000 / 2,700 = 4.07x; per round 4.23 3.70 4.11 (min 3.70); vs strong 11,000 / 6,000
    line = next(x for x in text.splitlines() if "| fineray |" in x)
    assert "| 11,000 |" in line and "4.07x" in line and "1.83x" in line
    assert "4.23 3.70 4.11 (min 3.70)" in line
    assert "0.40x" in line and "0.85x" in line  # memory vs naive (34/84) and vs strong (34/40)
    assert "ERROR strong 8b-real4-long round 1: RuntimeError: boom" in text
