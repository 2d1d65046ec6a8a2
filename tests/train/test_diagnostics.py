"""Curve diagnostics on synthetic histories."""

from fineray.train.diagnostics import diagnose


def _kinds(history):
    return {f["kind"] for f in diagnose(history)}


def test_overfitting_detected():
    hist = [{"step": i, "train_loss": 3 - 0.1 * i} for i in range(1, 13)]
    for i, v in zip((3, 6, 9, 12), (2.0, 1.8, 1.9, 2.1)):
        hist[i - 1]["val_loss"] = v
    assert "overfitting" in _kinds(hist)


def test_plateau_and_erratic():
    plateau = [{"train_loss": max(1.0, 3 - 0.5 * i)} for i in range(20)]
    assert "plateau" in _kinds(plateau)
    erratic = [{"train_loss": 1.0 if i % 2 else 3.0} for i in range(20)]
    assert "erratic" in _kinds(erratic)
    # a converged run's jitter (the quickstart: 0.62 -> ~0.03 +- 0.01) is not erratic
    converged = [{"train_loss": v} for v in [0.62, 0.35, 0.2, 0.12, 0.08, 0.05, 0.04] + [0.02, 0.035] * 6]
    assert "erratic" not in _kinds(converged)


def test_healthy_run_has_no_findings():
    hist = [{"train_loss": 3 - 0.05 * i, **({"val_loss": 3 - 0.05 * i} if i % 5 == 0 else {})} for i in range(30)]
    assert diagnose(hist) == []
