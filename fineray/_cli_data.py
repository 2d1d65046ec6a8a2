"""`fineray data audit|prepare|from-feedback|list|show`: data quality checks and versioned datasets."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from fineray._cli_common import console, fail, load_run_config, user_errors

if TYPE_CHECKING:
    from fineray.train.config import RunConfig

__all__ = ["data_app"]

data_app = typer.Typer(no_args_is_help=True, help="Audit data, publish cleaned and feedback datasets.")

_TARGET_HELP = "A run config (.yaml: its train/validation/eval data) or a data file (the train split)."


def _is_config(target: str) -> bool:
    return target.endswith((".yaml", ".yml"))


def _splits(target: str, overrides: list[str], validation: str | None, eval_data: str | None,
            fmt: str) -> tuple[RunConfig | None, dict[str, Any]]:
    """(run config or None, {split: [Source]}) for a config or a data file."""
    from fineray.train.audit import Source, run_splits

    if _is_config(target):
        cfg = load_run_config(Path(target), overrides)
        return cfg, run_splits(cfg)
    if overrides:
        fail(f"key=value overrides need a run config, not a data file ({target})")
    splits = {"train": [Source(target, fmt)]}
    if validation:
        splits["validation"] = [Source(validation, fmt)]
    if eval_data:
        splits["eval"] = [Source(eval_data, fmt)]
    return None, splits


def _tokenizer(cfg: RunConfig | None, model: str | None) -> Any:
    from fineray.train.config import EMBEDDED_MODEL, ModelConfig
    from fineray.train.model import load_tokenizer, resolve_base

    mc = ModelConfig(base=model) if model else (cfg.model if cfg is not None else ModelConfig(base=EMBEDDED_MODEL))
    return load_tokenizer(mc, resolve_base(mc.base))


@contextlib.contextmanager
def _progress(enabled: bool, what: str) -> Iterator[Callable[[int], None] | None]:
    """A live `N records` counter (records/s) on the console while a long pass runs."""
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(f"{what} [bold]{{task.completed:,}}[/] records"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done: bar.update(task, completed=done)


@data_app.command("audit")
def audit_cmd(target: str = typer.Argument(..., help=_TARGET_HELP),
              overrides: list[str] | None = typer.Argument(None, help="key=value overrides of the config"),
              validation: str | None = typer.Option(None, "--validation", help="Validation data (with a file)."),
              eval_data: str | None = typer.Option(None, "--eval", help="Eval data (with a file)."),
              fmt: str = typer.Option("auto", "--format", help="Record format of data files."),
              out: Path = typer.Option(Path("audit"), "--out", help="Folder for report.html, report.json, PNGs."),
              strict: bool = typer.Option(False, "--strict", help="Exit 1 on leakage or PII."),
              near: bool = typer.Option(True, "--near/--no-near", help="Near duplicates (MinHash LSH)."),
              pii: bool = typer.Option(True, "--pii/--no-pii", help="PII and secrets."),
              lengths: bool = typer.Option(True, "--lengths/--no-lengths", help="Token lengths (loads a tokenizer)."),
              model: str | None = typer.Option(None, "--model", help="Tokenizer's model (default: the config's)."),
              max_seq_len: int | None = typer.Option(None, help="Token limit (default: data.max_seq_len, or 512)."),
              ngram: int = typer.Option(8, help="n of the n-gram leakage check."),
              min_overlap: float = typer.Option(0.5, help="Share of a held-out record's n-grams that is a leak."),
              near_threshold: float = typer.Option(0.8, help="Jaccard similarity of a near duplicate."),
              no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Audit data: duplicates, leakage, PII, lengths, JSON outputs. Table here; HTML, JSON and PNGs in --out."""
    from fineray.train._audit_report import print_audit, write_audit
    from fineray.train.audit import AuditSettings, audit, problems

    cfg, splits = _splits(target, list(overrides or []), validation, eval_data, fmt)
    st = AuditSettings(max_seq_len=max_seq_len or (cfg.data.max_seq_len if cfg else 512), near=near, pii=pii,
                       lengths=lengths, near_threshold=near_threshold, ngram=ngram, min_overlap=min_overlap,
                       system_prompt=cfg.data.system_prompt if cfg else None)
    try:
        tok = _tokenizer(cfg, model) if lengths else None
        with _progress(not no_progress, "auditing") as tick:
            report = audit(splits, st, tokenizer=tok, on_progress=tick)
    except (ValueError, *user_errors()) as e:
        fail(str(e), 1)
    print_audit(report, console)
    paths = write_audit(report, out)
    console.print(f"report: {paths['html']}  json: {paths['json']}", highlight=False)
    found = problems(report)
    if strict and found:
        fail("--strict: " + ", ".join(f"{k} {v}" for k, v in found.items()), 1)


def _redact_kinds(value: str) -> tuple[str, ...]:
    from fineray.train.pii import PII_KINDS

    if value in ("pii", "all"):
        return PII_KINDS
    if value == "none":
        return ()
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in PII_KINDS]
    if bad:
        fail(f"--redact: unknown PII kind(s) {bad}; use pii (all), none, or a list of {', '.join(PII_KINDS)}")
    return kinds


@data_app.command("prepare")
def prepare_cmd(target: str = typer.Argument(..., help=_TARGET_HELP),
                overrides: list[str] | None = typer.Argument(None, help="key=value overrides of the config"),
                name: str = typer.Option(..., "--name", help="Dataset name; publishes NAME@vN."),
                registry: str | None = typer.Option(None, help="Registry (default: output.registry, or adapters)."),
                dedupe: str = typer.Option("exact", help="none | exact | near"),
                redact: str = typer.Option("pii", help="pii (every kind) | none | kinds, e.g. email,card"),
                min_tokens: int | None = typer.Option(None, help="Drop examples shorter than this."),
                max_tokens: int | None = typer.Option(None, help="Drop examples longer (default: data.max_seq_len)."),
                keep_leaked: bool = typer.Option(False, "--keep-leaked", help="Keep training records that leak."),
                on_error: str = typer.Option("fail", "--on-error", help="fail | skip (malformed records)"),
                validation: str | None = typer.Option(None, "--validation"),
                eval_data: str | None = typer.Option(None, "--eval"),
                fmt: str = typer.Option("auto", "--format"),
                model: str | None = typer.Option(None, "--model", help="Tokenizer's model (default: the config's)."),
                no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Dedupe, redact and filter data, then publish it as a versioned dataset (`dataset:NAME@vN`)."""
    from fineray.train.prepare import PrepareSettings, prepare

    if dedupe not in ("none", "exact", "near") or on_error not in ("fail", "skip"):
        fail("--dedupe is none | exact | near; --on-error is fail | skip")
    cfg, splits = _splits(target, list(overrides or []), validation, eval_data, fmt)
    limit = max_tokens or (cfg.data.max_seq_len if cfg else None)
    st = PrepareSettings(dedupe=dedupe, redact=_redact_kinds(redact), min_tokens=min_tokens, max_tokens=limit,
                         drop_leaked=not keep_leaked, on_error=on_error,
                         system_prompt=cfg.data.system_prompt if cfg else None)
    reg = registry or (cfg.output.registry if cfg else "adapters")
    try:
        tok = _tokenizer(cfg, model) if (limit or min_tokens) else None
        with _progress(not no_progress, "preparing") as tick:
            version, stats = prepare(splits, reg, name, st, tokenizer=tok, on_progress=tick,
                                     lineage={"prepared_from": target})
    except (ValueError, *user_errors()) as e:
        fail(str(e), 1)
    t = Table(title=f"dataset:{version.ref}")
    for col in ("split", "records", "removed"):
        t.add_column(col)
    for split, info in version.manifest["splits"].items():
        gone = {k.split(":", 1)[1]: v for k, v in stats["removed"].items() if k.startswith(f"{split}:")}
        t.add_row(split, str(info["records"]), ", ".join(f"{k} {v}" for k, v in gone.items()) or "0")
    console.print(t)
    if stats["redacted"]:
        console.print("redacted: " + ", ".join(f"{k} {v}" for k, v in stats["redacted"].items()), highlight=False)
    console.print(f"published dataset:{version.ref} in {reg}", highlight=False)


def _since_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", value.strip())
    if not m:
        fail(f"--since {value!r}: use a number and a unit, e.g. 30m, 12h, 7d, 2w")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


@data_app.command("from-feedback")
def from_feedback_cmd(logs: str = typer.Option(..., "--logs", help="Request log URI given to `fineray serve "
                                                                    "--log-requests`."),
                      name: str = typer.Option(..., "--name", help="Dataset name; publishes NAME@vN."),
                      since: str = typer.Option("7d", help="Only responses newer than this (30m, 12h, 7d)."),
                      registry: str = typer.Option("adapters", help="Registry to publish to."),
                      min_rating: float = typer.Option(1.0, help="Answers rated at least this are SFT examples."),
                      adapter: str | None = typer.Option(None, help="Only responses of this adapter (name).")) -> None:
    """Turn logged responses + feedback into an SFT split (corrections, highly rated answers) and a preference
    split (a correction or a good answer over a bad one for the same prompt), published as NAME@vN."""
    from fineray.serve.feedback import build_feedback_dataset

    try:
        version, counts = build_feedback_dataset(logs, registry, name, since_s=_since_seconds(since),
                                                 min_rating=min_rating, adapter=adapter)
    except (ValueError, *user_errors()) as e:
        fail(str(e), 1)
    console.print(f"published dataset:{version.ref} in {registry}: " +
                  ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


@data_app.command("list")
def list_cmd(registry: str = typer.Option("adapters", help="Registry (path or URI).")) -> None:
    """Every dataset version in the registry."""
    from fineray.train.datasets import DatasetRegistry

    t = Table(title=f"datasets in {registry}")
    for col in ("dataset", "splits", "created", "leakage", "pii"):
        t.add_column(col)
    for v in DatasetRegistry(registry).list():
        m = v.manifest
        totals = (m.get("audit") or {}).get("totals", {})
        t.add_row(f"dataset:{v.ref}", ", ".join(f"{s} {i['records']}" for s, i in m.get("splits", {}).items()),
                  m.get("created", ""), str(totals.get("leakage", "-")), str(totals.get("pii", "-")))
    console.print(t)


@data_app.command("show")
def show_cmd(ref: str = typer.Argument(..., help="NAME or NAME@vN (with or without `dataset:`)."),
             registry: str = typer.Option("adapters", help="Registry (path or URI).")) -> None:
    """The manifest of a dataset version."""
    from fineray.train.datasets import DatasetRegistry
    from fineray.train.registry import RegistryError

    try:
        v = DatasetRegistry(registry).get(ref.removeprefix("dataset:"))
    except RegistryError as e:
        fail(str(e), 1)
    console.print_json(json.dumps({"ref": f"dataset:{v.ref}", "uri": v.uri, **v.manifest}))
