"""Reward functions for GRPO: built-in verifiers, user callables and registered reward models.

Built-in verifiers (`rl.rewards[].name`), each scoring one completion:
  * json_valid: 1 if the completion holds a JSON object (`strict: true`: is exactly one), else 0;
  * json_schema: 1 if that object validates against `schema` (a JSON schema, or a path to one), else 0;
  * field_match: the share of the reference JSON's fields the completion reproduces (0 if not JSON);
  * exact_match: 1 if the stripped completion equals the stripped reference;
  * regex: 1 if `pattern` is found (`full: true`: matches the whole completion);
  * length_penalty: 0 up to `limit - window`, then falling linearly to -1 at `limit` (`unit`: chars | tokens).
The reference is the prompt's reference answer (`reference_key` in `args` picks another record column).

A user callable (`function: module:function` or `path/to/file.py:function`) is called like TRL's reward
functions: `fn(prompts=[...], completions=[...], references=[...], completion_tokens=[...], <record columns>,
**args)` and returns one float (or None: no score) per completion.

Every function runs as Ray tasks (reward models: calls to an actor holding the model), `rl.reward_chunk`
completions each, with the function's timeout. A call that raises, returns garbage, hangs past its timeout or
kills its worker costs only its completions' scores (0 in the sum, counted and reported): the trainer never
runs user code in its own process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fineray.train.metrics import field_accuracy, parse_json_object

__all__ = ["VERIFIERS", "RewardModelWorker", "RewardResult", "load_callable", "score_completions"]


def _json_valid(completion: str, *, strict: bool = False, **_: Any) -> float:
    if strict:
        try:
            return float(isinstance(json.loads(completion), dict))
        except ValueError:
            return 0.0
    return float(parse_json_object(completion) is not None)


@cache
def _schema_validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _json_schema(completion: str, *, schema: dict | str, **_: Any) -> float:
    if isinstance(schema, str):
        schema = json.loads(Path(schema).expanduser().read_text())
    obj = parse_json_object(completion)
    return float(obj is not None and _schema_validator(json.dumps(schema, sort_keys=True)).is_valid(obj))


def _field_match(completion: str, *, reference: str | None, **_: Any) -> float:
    return field_accuracy([completion], [reference]) if reference else 0.0


def _exact_match(completion: str, *, reference: str | None, **_: Any) -> float:
    return float(reference is not None and completion.strip() == reference.strip())


def _regex(completion: str, *, pattern: str, full: bool = False, **_: Any) -> float:
    return float(bool((re.fullmatch if full else re.search)(pattern, completion, flags=re.DOTALL)))


def _length_penalty(completion: str, *, limit: int, window: int | None = None, unit: str = "chars",
                    completion_tokens: int = 0, **_: Any) -> float:
    n = completion_tokens if unit == "tokens" else len(completion)
    window = window if window is not None else max(1, limit // 4)
    return -min(1.0, max(0.0, (n - (limit - window)) / window))


VERIFIERS: dict[str, Callable[..., float]] = {
    "json_valid": _json_valid, "json_schema": _json_schema, "field_match": _field_match,
    "exact_match": _exact_match, "regex": _regex, "length_penalty": _length_penalty,
}


_LOADED: dict[tuple[str, str | None], Callable[..., Any]] = {}


def load_callable(ref: str, cwd: str | None = None) -> Callable[..., Any]:
    """`module:function` (importable, or from `cwd`) or `path/to/file.py:function`; loaded once per process
    (a reward task's worker keeps it for the next steps)."""
    if (ref, cwd) not in _LOADED:
        _LOADED[(ref, cwd)] = _load(ref, cwd)
    return _LOADED[(ref, cwd)]


def _load(ref: str, cwd: str | None) -> Callable[..., Any]:
    target, _, name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute() and cwd:
            path = Path(cwd) / path
        spec = importlib.util.spec_from_file_location(f"fineray_reward_{path.stem}", path)
        if spec is None or spec.loader is None or not path.is_file():
            raise ImportError(f"reward function file not found: {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if cwd and cwd not in sys.path:
            sys.path.insert(0, cwd)
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ImportError(f"{ref}: {target} has no callable {name!r}")  # an import problem
    return fn


def _run_chunk(spec: dict[str, Any], prompts: list[str], completions: list[str], columns: dict[str, list[Any]],
               cwd: str | None) -> tuple[list[float | None], str | None]:
    """One reward task: scores of a chunk of completions (None where there is none) and the first error."""
    args = spec.get("args") or {}
    if spec.get("name"):
        fn = VERIFIERS[spec["name"]]
        ref_key = args.get("reference_key")
        refs = [r.get(ref_key) for r in columns["records"]] if ref_key else columns["references"]
        out: list[float | None] = []
        first = None
        for i, c in enumerate(completions):
            try:
                out.append(float(fn(c, reference=refs[i], completion_tokens=columns["completion_tokens"][i],
                                    **{k: v for k, v in args.items() if k != "reference_key"})))
            except Exception as e:  # noqa: BLE001 - a verifier failing on one completion scores only it
                out.append(None)
                first = first or f"{type(e).__name__}: {e}"
        return out, first
    fn = load_callable(spec["function"], cwd)
    extra = {k: v for k, v in columns.items() if k not in ("prompts", "completions")}
    scores = fn(prompts=prompts, completions=completions, **extra, **args)
    if not isinstance(scores, (list, tuple)) or len(scores) != len(completions):
        raise TypeError(f"returned {type(scores).__name__} of length {len(scores) if hasattr(scores, '__len__') else '?'}"
                        f"; expected a list of {len(completions)} floats")
    return [None if s is None or not math.isfinite(float(s)) else float(s) for s in scores], None


@cache
def _task() -> Any:
    import ray

    return ray.remote(max_retries=0)(_run_chunk)


class RewardModelWorker:
    """Ray actor body: a registered reward model scoring conversations (see `reward_model.RewardScorer`)."""

    def __init__(self, ref: str, registry: str, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from fineray.train.reward_model import RewardScorer

        if threads:
            torch.set_num_threads(threads)
        self.scorer = RewardScorer(ref, registry, device=device)

    def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float | None], str | None]:
        return [float(s) for s in self.scorer.score(conversations)], None


@dataclass
class RewardResult:
    """Scores `(completions, functions)` (NaN: no score) and, per function label, failure messages."""

    scores: np.ndarray
    labels: list[str]
    failures: dict[str, list[str]] = field(default_factory=dict)

    def total(self, weights: list[float]) -> np.ndarray:
        """The weighted sum per completion; a missing score adds 0."""
        return np.nan_to_num(self.scores, nan=0.0) @ np.asarray(weights, dtype=np.float64)


def score_completions(specs: list[Any], prompts: list[str], completions: list[str], columns: dict[str, list[Any]],
                      conversations: list[list[dict[str, str]]], reward_models: dict[str, Any] | None = None,
                      chunk: int = 64, cpus: float = 0.0) -> RewardResult:
    """Score completions with every reward function, as Ray tasks (or reward-model actor calls) with timeouts.

    Args:
        specs: `RewardSpec`s. prompts / completions: one per completion (the prompt text repeated per sample).
        columns: `references`, `completion_tokens`, `records` and any record column, one entry per completion.
        conversations: prompt messages + the completion as the assistant turn (what a reward model scores).
        reward_models: model reference -> `RewardModelWorker` actor handle.
    """
    import ray

    n = len(completions)
    scores = np.full((n, len(specs)), np.nan)
    failures: dict[str, list[str]] = {}
    pending: dict[Any, tuple[int, int, int, float, str]] = {}  # ref -> (function, start, end, deadline, label)
    cwd = os.getcwd()
    for j, spec in enumerate(specs):
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            if spec.model:
                ref = reward_models[spec.model].score.remote(conversations[s:e])
            else:
                part = {k: v[s:e] for k, v in columns.items()}
                ref = _task().options(num_cpus=cpus).remote(spec.model_dump(), prompts[s:e], completions[s:e], part, cwd)
            pending[ref] = (j, s, e, time.monotonic() + spec.timeout_s, spec.key)
    while pending:
        wait_s = max(0.0, min(v[3] for v in pending.values()) - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
        for ref in ready:
            j, s, e, _, label = pending.pop(ref)
            try:
                values, error = ray.get(ref)
                scores[s:e, j] = [np.nan if v is None else v for v in values]
                if error:
                    failures.setdefault(label, []).append(error)
            except Exception as exc:  # noqa: BLE001 - user code: raised, crashed its worker, bad return value
                failures.setdefault(label, []).append(_reason(exc))
        now = time.monotonic()
        for ref in [r for r, v in pending.items() if v[3] <= now]:
            j, s, e, _, label = pending.pop(ref)
            ray.cancel(ref, force=not specs[j].model)  # actor calls cannot be force-cancelled
            failures.setdefault(label, []).append(f"timed out after {specs[j].timeout_s:g} s ({e - s} completions)")
    return RewardResult(scores, [s.key for s in specs], failures)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [x for x in str(cause).strip().splitlines() if x.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]
