"""`fineray train`, `eval`, `export`, `plan` and `tune`: training runs, their evaluation and sweeps.

Components are imported inside the commands so that `fineray --help` and config errors stay instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fineray._cli_common import console, fail, load_run_config, print_summary, user_errors

__all__ = ["QUICKSTART", "eval_cmd", "export", "plan", "train", "tune"]

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def train(config: Path | None = typer.Argument(None, help="Run config YAML (default: the quickstart)."),
          overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
          no_eval: bool = typer.Option(False, "--no-eval", help="Skip the base-vs-tuned evaluation."),
          no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar."),
          json_out: Path | None = typer.Option(None, "--json", help="Also write the summary here."),
          no_data_checks: bool = typer.Option(False, "--no-data-checks",
                                              help="Skip the quick data checks (duplicates, leakage, length).")) -> None:
    """Fine-tune a model on Ray Train (LoRA, DoRA, QLoRA or full)."""
    overrides = list(overrides or [])
    if config is not None and "=" in str(config):  # `fineray train key=value` with no config file
        overrides.insert(0, str(config))
        config = None
    if config is None and QUICKSTART.exists():
        config = QUICKSTART
    cfg = load_run_config(config, overrides)
    from fineray.train.launcher import TrainingError, run_train

    try:
        summary = run_train(cfg, progress=not no_progress, evaluate=False if no_eval else None,
                            check_data=not no_data_checks)
    except (TrainingError, *user_errors()) as e:
        fail(str(e), 1)
    print_summary(summary)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2, default=str))


def eval_cmd(config: Path | None = typer.Argument(None, help="Run config YAML (model, data, eval sections)."),
             overrides: list[str] | None = typer.Argument(None),
             adapter: str | None = typer.Option(None, help="Registry reference (name, name@vN) or folder."),
             data: str | None = typer.Option(None, help="Held-out data file (default: eval.data).")) -> None:
    """Evaluate base vs fine-tuned on a held-out set (perplexity, EM, ROUGE-L, BLEU, JSON metrics)."""
    cfg = load_run_config(config, list(overrides or []))
    from fineray.train.evaluate import evaluate_run
    from fineray.train.launcher import resolve_adapter

    try:
        if adapter:
            cfg.model.adapter = adapter
        res = evaluate_run(cfg, resolve_adapter(cfg), data=data)
    except user_errors() as e:
        fail(str(e), 1)
    print_summary({"name": "eval", "base_metrics": res["base"], "tuned_metrics": res.get("tuned")})
    console.print_json(json.dumps(res, default=str))


def export(adapter: str = typer.Argument(..., help="Registry reference (name, name@vN) or adapter folder."),
           out: Path = typer.Argument(..., help="Output folder for the merged safetensors model."),
           registry: str = typer.Option("adapters", help="Adapter registry (path or URI)."),
           base: str | None = typer.Option(None, help="Base model (default: the adapter's manifest).")) -> None:
    """Merge an adapter into its base model and write a standalone safetensors model folder."""
    from fineray.train.export import merge_adapter

    try:
        path = merge_adapter(adapter, out, registry=registry, base=base)
    except user_errors() as e:
        fail(str(e), 1)
    console.print(f"merged model written to {path}")


def plan(config: Path = typer.Argument(...), overrides: list[str] | None = typer.Argument(None),
         gpu_memory_gib: float | None = typer.Option(None, help="Memory per GPU (default: 80)")) -> None:
    """Print the pre-flight checks and memory estimate of a run config."""
    cfg = load_run_config(config, list(overrides or []))
    from fineray.train.preflight import format_plan, plan_run

    plan_ = plan_run(cfg, gpu_memory_gib=gpu_memory_gib)
    console.print(format_plan(plan_))
    if not plan_.ok:
        raise typer.Exit(1)


def tune(config: Path | None = typer.Argument(None, help="Run config YAML with a `tune:` section."),
         overrides: list[str] | None = typer.Argument(None, help="key=value overrides"),
         resume: str | None = typer.Option(None, "--resume", help="Continue the interrupted sweep in RUN_DIR."),
         no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Hyperparameter sweep: Ray Tune + Optuna (TPE) with ASHA; registers the best adapter."""
    from fineray.tune import SweepError, print_sweep, resume_sweep, run_sweep

    try:
        if resume:
            result = resume_sweep(resume, progress=not no_progress)
        else:
            if config is None:
                fail("give a config with a `tune:` section (e.g. configs/sweep.yaml), or --resume RUN_DIR")
            result = run_sweep(load_run_config(config, list(overrides or [])), progress=not no_progress)
    except (SweepError, *user_errors()) as e:
        fail(str(e), 1)
    print_sweep(result, console)

