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


def _evals(*rows):
    return [{"step": 10 * i, "val_loss": 0.5, **dict(zip(("val_reward_accuracy", "val_reward_margin",
                                                           "val_logp_chosen"), r))} for i, r in enumerate(rows)]


def test_preference_margin_explosion_displacement_and_stall():
    assert "margin_explodes" in _kinds(_evals((0.9, 1.0, -1.0), (1.0, 14.0, -1.5)))
    # the DPO run at lr 5e-4 on the support pairs: the chosen answers lost 19 nats while the margin grew
    assert "margin_explodes" in _kinds(_evals((0.95, 0.88, -0.98), (0.90, 3.9, -13.8), (0.89, 4.1, -20.1)))
    assert "accuracy_stalls" in _kinds(_evals((0.52, 0.1, -5), (0.53, 0.1, -5), (0.52, 0.1, -5)))
    assert _kinds(_evals((0.6, 0.2, -5), (0.8, 1.0, -5.5), (0.95, 2.0, -6))) == set()
