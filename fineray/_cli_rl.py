"""`fineray rl`: online reinforcement fine-tuning (GRPO with verifiable rewards) on Ray.

Components are imported inside the command so that `fineray --help` and config errors stay instant.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fineray._cli_common import console, fail, fmt, load_run_config, print_summary, user_errors

__all__ = ["rl"]


def rl(config: Path = typer.Argument(..., help="Run config YAML with an `rl:` section (configs/grpo.yaml)."),
       overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. rl.beta=0.04"),
       no_eval: bool = typer.Option(False, "--no-eval", help="Skip the base-vs-tuned evaluation."),
       no_progress: bool = typer.Option(False, "--no-progress", help="No live progress bar."),
       json_out: Path | None = typer.Option(None, "--json", help="Also write the summary here.")) -> None:
    """GRPO: sample G completions per prompt, score them with reward functions, train on group advantages."""
    cfg = load_run_config(config, list(overrides or []))
    from fineray.rl import run_rl
    from fineray.train.launcher import TrainingError

    try:
        summary = run_rl(cfg, progress=not no_progress, evaluate=False if no_eval else None)
    except (TrainingError, *user_errors()) as e:
        fail(str(e), 1)
    print_summary(summary)
    for k in ("rollout", "reward_first", "reward_last", "val_reward_first", "val_reward_last", "rollout_s",
              "reward_s", "train_s"):
        if k in summary:
            console.print(f"{k:>17}  {fmt(summary[k])}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2, default=str))
