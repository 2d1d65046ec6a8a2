"""One sweep trial: a Ray Tune function trainable that builds and fits a Ray Train `TorchTrainer`.

The trainable runs in a Tune trial actor holding a token 0.01 CPU; the Ray Train workers it starts hold the
real resources (`scaling`). Metrics flow worker -> Train controller -> `TuneReportCallback` -> Tune, at every
eval interval of the training loop, so ASHA can stop a bad trial after its first eval.

Per-trial storage (`<sweep>/trials/<trial_id>/`, local or `s3://`):
    ray/             the trial's Ray Train run; a restarted trial (retry or `--resume`) continues from its
                     latest checkpoint there
    attempts.jsonl   one line per start of this trial (a resumed sweep must not re-run finished trials)
    final.json       final metrics + checkpoint path, written when the trial finished; a trial restarted
                     after that reports it again instead of training again
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fineray.base import storage
from fineray.train.config import RunConfig, validate_config

__all__ = ["LOOP_DONE", "append_line", "evaluate_adapter", "run_trial", "trial_config", "trial_uri", "weights_dir"]

# The loop reports `done`; Tune reads a `done` key as "this trial is finished" and would stop the trial
# before `fit()` returns (no final eval, no final.json), so it is forwarded to Tune under this name.
LOOP_DONE = "train_done"


def trial_uri(sweep_uri: str, trial_id: str) -> str:
    """Storage folder of one trial."""
    return storage.join(sweep_uri, "trials", trial_id)


def trial_config(base: dict[str, Any], params: dict[str, Any], sweep_uri: str, trial_id: str,
                 needs_eval: bool = False) -> RunConfig:
    """The run config of one trial: the base config with the trial's parameters applied."""
    data = copy.deepcopy(base)
    data.pop("tune", None)
    for key, value in params.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[leaf] = value
    out = data.setdefault("output", {})
    out["dir"], out["name"], out["register_adapter"] = storage.join(sweep_uri, "trials"), trial_id, False
    data.setdefault("eval", {})["enabled"] = needs_eval
    return validate_config(data, f"trial {trial_id}")


def weights_dir(ckpt_dir: Path) -> Path:
    """The adapter/ (PEFT) or model/ (full fine-tune) folder of a checkpoint."""
    return ckpt_dir / "adapter" if (ckpt_dir / "adapter").is_dir() else ckpt_dir / "model"


def evaluate_adapter(cfg: RunConfig, adapter_dir: Path, threads: int | None = None) -> dict[str, float]:
    """Held-out metrics of the tuned model only (the base model's numbers are the same for every trial)."""
    import torch

    from fineray.train.evaluate import evaluate_examples, load_eval_examples
    from fineray.train.model import load_base_model, load_tokenizer, resolve_base

    if threads:
        torch.set_num_threads(threads)
    examples, general = load_eval_examples(cfg)
    base_path = resolve_base(cfg.model.base)
    tok = load_tokenizer(cfg.model, base_path)
    if (adapter_dir / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_model(cfg.model, method="lora", path=base_path),
                                          str(adapter_dir))
    else:
        model = load_base_model(cfg.model, method="full", path=str(adapter_dir))
    res = evaluate_examples(model, tok, examples, cfg.eval, cfg.data.max_seq_len, general)
    return {k: float(v) for k, v in res.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "eval_s")}


def _report_callback() -> Any:
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Forward(TuneReportCallback):
        """TuneReportCallback that renames the loop's `done` (see LOOP_DONE)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            renamed = [{(LOOP_DONE if k == "done" else k): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, renamed, checkpoint)

    return _Forward()


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {(LOOP_DONE if k == "done" else k): v for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool)) or v is None}


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep_uri: str, keys: list[str],
              needs_eval: bool = False, eval_threads: int = 1) -> None:
    """Tune function trainable: fit one trial's TorchTrainer (wrapped with `tune.with_parameters`).

    Args:
        config: the trial's sampled parameters (dotted RunConfig keys).
        base: the base run config as a plain dict.
        sweep_uri: the sweep folder (local path or storage URI).
        keys: the searched keys (the parameters of `config` to apply).
        needs_eval: run the held-out evaluation after training and report its metrics.
        eval_threads: torch threads for that evaluation (the trial's CPU share).
    """
    import ray.tune

    from fineray.train.launcher import TrainingError, make_trainer, root_cause

    trial_id = ray.tune.get_context().get_trial_id()
    params = {k: config[k] for k in keys}
    uri = trial_uri(sweep_uri, trial_id)
    fs, path = storage.open_fs(uri)
    append_line(fs, f"{path}/attempts.jsonl", {"time": time.time(), "pid": os.getpid(),
                                           "host": socket.gethostname(), "params": params})
    if storage.exists(fs, f"{path}/final.json"):  # finished before the sweep driver died: report, do not retrain
        ray.tune.report(json.loads(storage.read_bytes(fs, f"{path}/final.json")))
        return
    cfg = trial_config(base, params, sweep_uri, trial_id, needs_eval)
    remote = storage.is_remote(uri)
    trainer = make_trainer(cfg, Path(path), storage_path=uri if remote else None, callbacks=[_report_callback()])
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingError(f"trial {trial_id} failed: {root_cause(e)}") from e
    final = _scalar_metrics(dict(result.metrics or {}))
    if final.get("stop_reason") == "diverged":
        # A bad configuration (e.g. too high a learning rate), not a failure to retry: the trial ends without
        # an objective value, Optuna records it as pruned and the table shows it as diverged.
        storage.atomic_write_bytes(fs, f"{path}/final.json", json.dumps(final, default=str).encode())
        ray.tune.report(final)
        return
    if result.checkpoint is None:
        raise TrainingError(f"trial {trial_id} produced no checkpoint")
    final["checkpoint_path"] = result.checkpoint.path
    if needs_eval:
        with result.checkpoint.as_directory() as d:
            final.update(evaluate_adapter(cfg, weights_dir(Path(d)), threads=eval_threads))
        final["evaluated"] = True
    storage.atomic_write_bytes(fs, f"{path}/final.json", json.dumps(final, default=str).encode())
    # The last Train report already reached Tune; this one adds the eval metrics and makes the trial's last
    # result carry the final checkpoint even if the callback's queue was still draining.
    ray.tune.report(final)


def append_line(fs: Any, path: str, row: dict[str, Any]) -> None:
    """Append one JSON line to a (local or remote) file by rewriting it atomically (files here are small)."""
    old = storage.read_bytes(fs, path) if storage.exists(fs, path) else b""
    storage.atomic_write_bytes(fs, path, old + (json.dumps(row, default=str) + "\n").encode())
