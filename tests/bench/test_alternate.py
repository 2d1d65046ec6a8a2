"""The alternating-runs summary: medians, ratios of medians and per-round ratios (bench/alternate.py)."""

from __future__ import annotations

from alternate import summary


def _row(side: str, rnd: int, tps: float, peak: float) -> dict:
    return {"side": side, "case": "8b-real4-long", "round": rnd, "tokens_per_s": tps, "mfu": tps / 1e5,
            "peak_alloc_gib": peak, "seconds": 10.0, "steps_timed": 30,
            "step_ms": [None, 900.0, 300.0, 200.0, 150.0, 140.0] + [rnd * 10.0] * 29}


def test_summary_reports_median_ratios_and_the_worst_round() -> None:
    # Prepare: three rounds; fineray's round 2 is its slow one
    rows = [_row("baseline", r, t, 84.0) for r, t in ((1, 2600), (2, 2700), (3, 2800))]
    rows += [_row("strong", r, t, 40.0) for r, t in ((1, 6000), (2, 6100), (3, 5900))]
    rows += [_row("fineray", r, t, 34.0) for r, t in ((1, 11000), (2, 10000), (3, 11500))]
    rows.append({"side": "strong", "case": "8b-real4-long", "round": 1, "error": "RuntimeError: boom"})
    profile = {"steps": 2, "wall_ms_per_step": 160.0, "gpu_busy_ms_per_step": 120.0, "gpu_busy_fraction": 0.75,
               "launches_per_step": 9000, "kinds_ms_per_step": {"gemm": 90.0}, "top_kernels_ms_per_step": []}
    rows.append({**_row("fineray", 0, 9000, 34.0), "profiled": True, "warmup": 4, "profile": profile})

    # Execute
    text = summary(rows)

    # Assert: median 11,000 / 2,700 = 4.07x; per round 4.23 3.70 4.11 (min 3.70); vs strong 11,000 / 6,000
    line = next(x for x in text.splitlines() if "| fineray |" in x)
    assert "| 11,000 |" in line and "4.07x" in line and "1.83x" in line
    assert "4.23 3.70 4.11 (min 3.70)" in line
    assert "0.40x" in line and "0.85x" in line  # memory vs naive (34/84) and vs strong (34/40)
    assert "ERROR strong 8b-real4-long round 1: RuntimeError: boom" in text
    # the profiled steps 5-6 took (150 + 140) / 2 = 145 ms in each timed run
    assert "PROFILE 8b-real4-long fineray: wall 160.0 ms/step (the same steps in the timed runs: 145.0)" in text
    assert "GPU busy 120.0 ms/step = 75.0% of wall" in text
