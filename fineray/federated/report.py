"""Results of a federation: the per-round table, the local vs federated vs centralised comparison, curves."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FederationResult", "plot_curves", "print_federation", "version_eval"]


@dataclass
class FederationResult:
    """What a federation produced.

    Attributes:
        name: Run name (``output.name``).
        run_dir: Run folder (checkpoints, exported adapter, ``rounds.jsonl``, ``curves.png``, ``summary.json``).
        strategy: Aggregation strategy.
        silos: Silo names.
        rounds: One row per round: participation, rejections (``{silo: [reasons]}``), stragglers, silos
            dropped during secure aggregation, mean local train loss, epsilon, and ``eval`` = the new global
            adapter's losses (:func:`version_eval`).
        initial_eval: :func:`version_eval` of the round-0 adapter.
        comparison: Rows ``{method, mean_val_loss, cross_val_loss, held_out_loss, steps}`` for
            ``local-only``, ``federated`` and ``centralised`` (simulation with baselines). ``mean_val_loss``:
            each silo's validation set (local-only: each silo's own model); ``cross_val_loss``: every model
            on every silo's set; ``steps``: optimizer steps summed over models (equal compute).
        epsilon: DP epsilon spent (None without DP); ``delta`` its delta.
        adapter_dir: The exported PEFT folder of the final global model.
        registry_ref: ``name@vN`` of the registered adapter (None if not registered).
        curves_png: Loss (and epsilon) curves.
        wall_s: Wall time of the whole run.
    """

    name: str
    run_dir: str
    strategy: str
    silos: list[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial_eval: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    adapter_dir: str = ""
    registry_ref: str | None = None
    curves_png: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    def write(self, path: str | Path) -> None:
        """Writes ``summary.json``-style JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))


def version_eval(evals: dict[str, dict[str, Any]], version: int, silos: list[str]) -> dict[str, Any]:
    """Losses of global version ``version``: ``{per_silo: {silo: loss}, mean_val, held_out}``."""
    got = evals.get(str(version), {})
    per_silo = {s: got[s].get("loss") for s in silos if s in got}
    vals = [v for v in per_silo.values() if isinstance(v, (int, float))]
    held = got.get("held_out", {}).get("loss")
    return {"per_silo": per_silo, "mean_val": sum(vals) / len(vals) if vals else None, "held_out": held}


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_federation(result: FederationResult, console: Any = None) -> None:
    """Prints the per-round table, rejection details and the comparison table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"federation {result.name}: {result.strategy}, {len(result.silos)} silos")
    rows = result.rounds
    # Columns that would be empty in every row are left out, so the table fits an 80-column terminal.
    lists = ("rejected", "stragglers", "dropped")
    show = {c: any(r.get(c) for r in rows) for c in lists} | {"epsilon": any(r.get("epsilon") is not None for r in rows)}
    cols = [c for c in ("round", "status", "accepted", *lists, "train loss", "mean val", "held-out", "epsilon",
                        "wall s") if show.get(c, True)]
    for c in cols:
        t.add_column(c, justify="left" if c in ("status", *lists) else "right")
    init = result.initial_eval

    def add(values: dict[str, str]) -> None:
        t.add_row(*[values.get(c, "") for c in cols])

    add({"round": "0", "status": "initial", "mean val": _f(init.get("mean_val")), "held-out": _f(init.get("held_out"))})
    for row in rows:
        ev = row.get("eval", {})
        add({"round": str(row["round"]), "status": row.get("status", ""),
             "accepted": f"{len(row.get('accepted', []))}/{len(row.get('participants', []))}",
             **{c: ", ".join(row.get(c) or []) for c in lists},
             "train loss": _f(row.get("train_loss")), "mean val": _f(ev.get("mean_val")),
             "held-out": _f(ev.get("held_out")), "epsilon": _f(row.get("epsilon"), 3),
             "wall s": _f(row.get("wall_s"), 1)})
    console.print(t)
    v = Table(title="validation loss per silo")
    v.add_column("round", justify="right")
    for silo in result.silos:
        v.add_column(silo, justify="right")
    for rnd, ev in [(0, init)] + [(r["round"], r.get("eval", {})) for r in result.rounds]:
        v.add_row(str(rnd), *[_f(ev.get("per_silo", {}).get(s)) for s in result.silos])
    console.print(v)
    for row in result.rounds:
        for silo, reasons in row.get("rejected", {}).items():
            console.print(f"[yellow]round {row['round']}: rejected {silo}:[/] {'; '.join(reasons)}", highlight=False)
    if result.epsilon is not None:
        console.print(f"differential privacy: epsilon = {result.epsilon:.3f} at delta = {result.delta:g}")
    if result.comparison:
        c = Table(title="local-only vs federated vs centralised (validation loss, nats/token)")
        for col in ("method", "own silo val", "all silos val", "held-out", "total steps"):
            c.add_column(col, justify="left" if col == "method" else "right")
        for r in result.comparison:
            c.add_row(r["method"], _f(r.get("mean_val_loss")), _f(r.get("cross_val_loss")),
                      _f(r.get("held_out_loss")), _f(r.get("steps")))
        console.print(c)
    if result.registry_ref:
        console.print(f"global adapter registered as [bold]{result.registry_ref}[/] ({result.adapter_dir})")


def plot_curves(result: FederationResult, out: str | Path) -> Path | None:
    """Mean silo validation and held-out loss per round (+ per-silo lines, + epsilon); None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, result.initial_eval)] + [(r["round"], r.get("eval", {})) for r in result.rounds]
    if not any(e.get("mean_val") is not None or e.get("held_out") is not None for _, e in points):
        return None
    dp = [r.get("epsilon") for r in result.rounds]
    has_dp = any(e is not None for e in dp)
    fig, axes = plt.subplots(1, 2 if has_dp else 1, figsize=(11 if has_dp else 7, 4), squeeze=False)
    ax = axes[0][0]
    for silo in result.silos:
        xs = [x for x, e in points if e.get("per_silo", {}).get(silo) is not None]
        ax.plot(xs, [e["per_silo"][silo] for x, e in points if x in xs], alpha=0.35, lw=1, label=f"val {silo}")
    for key, label, style in (("mean_val", "mean silo val", "o-"), ("held_out", "global held-out", "s-")):
        xs = [x for x, e in points if e.get(key) is not None]
        if xs:
            ax.plot(xs, [e[key] for x, e in points if x in xs], style, lw=2, label=label)
    for row in result.comparison:
        if row["method"] != "federated" and row.get("held_out_loss") is not None:
            ax.axhline(row["held_out_loss"], ls="--", lw=1, label=f"{row['method']} held-out", color="grey"
                       if row["method"] == "local-only" else "black")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"global adapter ({result.strategy})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_dp:
        ax2 = axes[0][1]
        ax2.plot([r["round"] for r in result.rounds], dp, "o-")
        ax2.set_xlabel("round")
        ax2.set_ylabel(f"epsilon at delta={result.delta:g}")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
