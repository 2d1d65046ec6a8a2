"""Median of N alternating runs of naive, strong and fineray on one GPU, in one call (issue 17).

Each side lives in its own resident worker process (`bench/train_throughput.py --worker --side S`) for the
whole call: it imports its stack once, builds its model once per shape (the three build at the same time,
untimed) and keeps fineray's compiled blocks, so repeating a case costs only its steps. Own processes are
also required, not only cheaper: Liger patches transformers' Llama module globally (RoPE function, RMSNorm
and MLP classes), so the strong side must not share a process with the other two. Peak memory stays
per side (each process has its own allocator; idle workers hold their model but no activations).

Before a case's rounds every side runs its warm-up steps once, untimed (`warm` rows: torch.compile, the flex
attention and Liger/TRL Triton kernels, cuBLAS, the allocator); for realistic lengths strong and fineray warm
up at the same time (their compiles are CPU work; their peaks fit together beside naive's idle model).
A round then runs the case once per side, in the order naive, strong, fineray; rounds repeat (alternating runs).
The table reports per side the median useful tok/s over the rounds, and for fineray the ratio of medians
against naive and strong plus the per-round ratios (their minimum = "in every run"). Every run is one
JSONL row (with `round`). The plan runs in order, under a time budget: a case is skipped when too little
time is left for a round of it, and every command has a timeout (a stuck worker is killed and replaced).

Usage:
  python bench/alternate.py --device cuda --plan 8b-real4-long:3,1b-real16:3,8b-full4:1,1b-full8:1 \\
      --profile 8b-real4-long --budget-s 480 --out $OUT/alt.jsonl --logs $OUT
  python bench/alternate.py --device cpu --plan tiny-smoke:2 --profile tiny-smoke --out /tmp/alt.jsonl
  python bench/alternate.py --table alt.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIDES = ("baseline", "strong", "fineray")
LABEL = {"baseline": "naive", "strong": "strong", "fineray": "fineray"}


class Worker:
    """One side's resident process; `ask` sends one command and waits for its `@@W` reply."""

    def __init__(self, side: str, device: str, log: Path) -> None:
        self.side, self.device, self.log_path = side, device, log
        self.proc: subprocess.Popen[str] | None = None
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def start(self) -> None:
        self.replies = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "train_throughput.py"), "--worker", "--side", self.side,
             "--device", self.device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, args=(self.proc, self.replies), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str], replies: queue.Queue[dict[str, Any] | None]) -> None:
        with open(self.log_path, "a") as log:
            for line in proc.stdout or []:
                if line.startswith("@@W "):
                    replies.put(json.loads(line[4:]))
                else:
                    log.write(line)
                    log.flush()
        replies.put(None)  # the process ended

    def send(self, cmd: dict[str, Any]) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
            self.wait(120)  # the ready line
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=max(1.0, timeout))
        except queue.Empty:
            self.kill()
            return {"error": f"timeout after {timeout:.0f} s (worker killed)"}
        if reply is None:
            code = self.proc.wait() if self.proc else None
            return {"error": f"worker exited with code {code} (see {self.log_path.name})"}
        return reply

    def ask(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(cmd)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the process and its children only
            self.proc.wait()

    def quit(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


def _shape(case: str) -> str:
    return case.split("-")[0]


def run_plan(a: argparse.Namespace) -> list[dict[str, Any]]:
    t0 = time.monotonic()

    def left() -> float:
        return a.budget_s - (time.monotonic() - t0)

    def cap(limit: float) -> float:  # one command's timeout: its own limit, and never past the budget
        return min(limit, left() - 5)

    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    sides = a.sides.split(",")
    opts = {s: {"strong_attn": a.strong_attn, "strong_impl": a.strong_impl} for s in sides}
    workers = {s: Worker(s, a.device, logs / f"worker-{LABEL[s]}.log") for s in sides}
    for w in workers.values():
        w.start()
    for s, w in workers.items():
        print(f"[{time.monotonic() - t0:.0f}s] {s} worker: {w.wait(180)}", flush=True)
    rows: list[dict[str, Any]] = []
    walls: dict[tuple[str, str], float] = {}
    shape = None
    seen: set[str] = set()  # shapes already compiled by the workers in this call

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
        brief = {k: row.get(k) for k in ("side", "case", "round", "tokens_per_s", "mfu", "peak_alloc_gib",
                                         "wall_s", "error", "attn") if row.get(k) is not None}
        print(f"[{time.monotonic() - t0:.0f}s] RESULT {json.dumps(brief, default=float)}", flush=True)

    def warm_up(case: str) -> float | None:
        """Every side's warm-up steps, untimed (strong and fineray together for realistic lengths); returns an
        estimate of one round's time from naive's warm-up (the slowest side), if it ran."""
        est = None
        together = [s for s in ("strong", "fineray") if s in sides] if "-real" in case else []
        for group in [together] + [[s] for s in sides if s not in together]:
            if not group:
                continue
            for s in group:
                workers[s].send({"cmd": "run", "case": case, "opts": {**opts[s], "warm": True}})
            for s in group:
                row = workers[s].wait(cap(2 * a.run_timeout_s))  # warm-ups compile
                row.setdefault("side", s)
                row.setdefault("case", case)
                emit({**row, "round": -1, "warm": True, "together": group if len(group) > 1 else None})
                if s == "baseline" and "error" not in row and row.get("steps_run"):
                    # naive is the slowest side; its warm-up wall includes ~2 s of trainer set-up
                    est = 2 * row["wall_s"] * (row["warmup"] + row["case_steps"]) / row["steps_run"]
                if s == "strong" and _flex_failed(row, opts[s], a.device):
                    opts[s] = {**opts[s], "strong_attn": "sdpa"}  # sdpa also separates documents
                    print(f"strong: flex_attention failed in the warm-up, sdpa from now on: {row['error'][:200]}",
                          flush=True)
                    row = workers[s].ask({"cmd": "run", "case": case, "opts": {**opts[s], "warm": True}},
                                         cap(2 * a.run_timeout_s))
                    emit({**row, "side": s, "case": case, "round": -1, "warm": True})
        return est

    def ask_all(cmd: dict[str, Any], timeout: float) -> None:
        for w in workers.values():  # send to all first: the workers do it at the same time
            w.send(cmd)
        for s, w in workers.items():
            r = w.wait(timeout)
            print(f"[{time.monotonic() - t0:.0f}s] {cmd['cmd']} {cmd.get('case', '')} {s}: "
                  f"{json.dumps(r, default=float)[:300]}", flush=True)

    try:
        for item in a.plan.split(","):
            case, _, n = item.partition(":")
            rounds = int(n or a.rounds)
            need_first = a.min_first_s * len(sides) * (0.5 if _shape(case) in seen else 1.0)
            if left() < need_first:
                print(f"SKIP {case}: {left():.0f} s left < {need_first:.0f} s for its warm-up and a round",
                      flush=True)
                continue
            if _shape(case) != shape:
                if shape is not None:
                    ask_all({"cmd": "release"}, 120)
                ask_all({"cmd": "prepare", "case": case, "opts": opts.get("strong", {})}, min(300, left()))
                shape = _shape(case)
                seen.add(shape)
            first_est = warm_up(case)
            for r in range(1, rounds + 1):
                est = sum(walls[(s, case)] for s in sides) if all((s, case) in walls for s in sides) else \
                    first_est or a.min_first_s * len(sides)
                if left() < est * 1.1 + 10:
                    print(f"SKIP {case} rounds {r}-{rounds}: {left():.0f} s left, a round takes ~{est:.0f} s",
                          flush=True)
                    break
                for s in sides:
                    row = workers[s].ask({"cmd": "run", "case": case, "opts": opts[s]}, cap(a.run_timeout_s))
                    if s == "strong" and _flex_failed(row, opts[s], a.device) and left() > a.min_first_s:
                        # flex_attention did not run here (compile/lowering): sdpa also separates documents
                        emit({**row, "round": r})
                        opts[s] = {**opts[s], "strong_attn": "sdpa"}
                        row = workers[s].ask({"cmd": "run", "case": case, "opts": opts[s]}, cap(a.run_timeout_s))
                    row.setdefault("side", s)
                    row.setdefault("case", case)
                    row["round"] = r
                    emit(row)
                    if "wall_s" in row and "error" not in row:
                        walls[(s, case)] = row["wall_s"]
            if case in a.profile.split(","):
                for s in [x for x in ("fineray", "strong", "baseline") if x in sides]:
                    if left() < a.min_first_s:
                        print(f"SKIP profile {case} {s}: {left():.0f} s left", flush=True)
                        break
                    cmd = {"cmd": "run", "case": case, "opts": {**opts[s], "profile_steps": a.profile_steps}}
                    row = workers[s].ask(cmd, cap(a.run_timeout_s))
                    row.setdefault("side", s)
                    row.setdefault("case", case)
                    row["round"] = 0
                    emit(row)
    finally:
        for w in workers.values():
            w.quit()
    return rows


def _flex_failed(row: dict[str, Any], opts: dict[str, Any], device: str) -> bool:
    """A strong run that failed inside flex_attention on the GPU (not an OOM, not a refused check)."""
    err = row.get("error", "")
    return (device == "cuda" and opts.get("strong_attn") in ("auto", "flex_attention") and bool(err)
            and "OutOfMemory" not in err and "attends across" not in err and "timeout" not in err)


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["tokens_per_s"])
    return runs[(len(runs) - 1) // 2]  # the (lower) median run


def _ratio(by: dict[str, list[dict[str, Any]]], s: str, ref: str, key: str = "tokens_per_s") -> str:
    """Ratio of medians (tok/s) or of the largest peaks (memory) of side `s` against side `ref`."""
    if s == ref or not by.get(s) or not by.get(ref) or any(key not in r for r in by[s] + by[ref]):
        return ""
    if key == "peak_alloc_gib":
        return f"{max(r[key] for r in by[s]) / max(r[key] for r in by[ref]):.2f}x"
    return f"{statistics.median(r[key] for r in by[s]) / statistics.median(r[key] for r in by[ref]):.2f}x"


def _per_round(by: dict[str, list[dict[str, Any]]], s: str, ref: str) -> str:
    """tok/s ratio of `s` against `ref` in each round both ran (and the smallest: "in every run")."""
    if s == ref or not by.get(s) or not by.get(ref):
        return ""
    mine, theirs = ({r.get("round"): r for r in by[x]} for x in (s, ref))
    vals = [mine[k]["tokens_per_s"] / theirs[k]["tokens_per_s"] for k in sorted(set(mine) & set(theirs))]
    return " ".join(f"{v:.2f}" for v in vals) + (f" (min {min(vals):.2f})" if len(vals) > 1 else "")


def _side_label(s: str, r: dict[str, Any]) -> str:
    if s != "strong":
        return LABEL[s]
    return f"strong ({r.get('impl')}, {r.get('attn')}, liger {'on' if r.get('liger') else 'off'})"


def _profile_lines(r: dict[str, Any], timed: list[dict[str, Any]]) -> list[str]:
    p = r["profile"]
    w, k = r["warmup"], p["steps"]  # the profiled steps are w+1 .. w+k; the timed runs ran the same batches
    same = [sum(x["step_ms"][w:w + k]) / k for x in timed if len(x.get("step_ms", [])) >= w + k]
    unprof = statistics.median(same) if same else None
    head = (f"PROFILE {r['case']} {LABEL[r['side']]}: wall {p['wall_ms_per_step']:.1f} ms/step (the same steps in "
            f"the timed runs: {'-' if unprof is None else f'{unprof:.1f}'}), GPU busy {p['gpu_busy_ms_per_step']:.1f} "
            f"ms/step = {p['gpu_busy_fraction']:.1%} of wall, {p['launches_per_step']:.0f} launches/step; "
            f"ms/step by kind {p['kinds_ms_per_step']}")
    lines = [head]
    lines += [f"  {ms:8.3f} ms/step  x{n:<6} {name}" for name, ms, n in p["top_kernels_ms_per_step"][:6]]
    return lines


def summary(rows: list[dict[str, Any]]) -> str:
    """Per case: each side's runs and median; ratios of medians and per round against naive and strong."""
    ok = [r for r in rows if "error" not in r and not r.get("profiled") and not r.get("warm") and "tokens_per_s" in r]
    head = ("| case | side | runs (useful tok/s) | median tok/s | MFU | peak alloc GiB | x naive | x strong | "
            "x naive per round | x strong per round | mem / naive | mem / strong |")
    out = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for case in dict.fromkeys(r["case"] for r in ok):
        by = {s: [r for r in ok if r["case"] == case and r["side"] == s] for s in SIDES}
        for s, runs in [(s, v) for s, v in by.items() if v]:
            med = _median_row(runs)
            tps = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in sorted(runs, key=lambda x: x.get("round", 0)))
            peak = max(x.get("peak_alloc_gib", float("nan")) for x in runs)
            m = statistics.median(x["tokens_per_s"] for x in runs)  # MFU is linear in tok/s for one case:
            mfu = med["mfu"] * m / med["tokens_per_s"]  # the median run's, scaled (even counts average two)
            out.append(f"| {case} | {_side_label(s, med)} | {tps} | {m:,.0f} | {mfu:.1%} | "
                       f"{peak:.1f} | {_ratio(by, s, 'baseline')} | {_ratio(by, s, 'strong')} | "
                       f"{_per_round(by, s, 'baseline')} | {_per_round(by, s, 'strong')} | "
                       f"{_ratio(by, s, 'baseline', 'peak_alloc_gib')} | {_ratio(by, s, 'strong', 'peak_alloc_gib')} |")
    out += [f"ERROR {r.get('side')} {r.get('case')} round {r.get('round')}: {r['error'][:300]}"
            for r in rows if "error" in r]
    out += [f"WARM {r['case']} {LABEL.get(r['side'], r['side'])}: {r['wall_s']:.0f} s (untimed warm-up"
            f"{', together with ' + '+'.join(r['together']) if r.get('together') else ''})"
            for r in rows if r.get("warm") and "error" not in r]
    for r in [r for r in rows if r.get("profile")]:
        out += _profile_lines(r, [x for x in ok if x["case"] == r["case"] and x["side"] == r["side"]])
    shown = set()
    for r in rows:
        d = r.get("doc_separation")
        if d and (r["case"], d["attn"]) not in shown:  # checked once per worker, shape and attention
            shown.add((r["case"], d["attn"]))
            out.append(f"SEPARATION {r['case']} strong {d['attn']}: packed vs separate {d['packed_vs_separate']:.2e} "
                       f"(rounding floor, document 1: {d.get('noise_doc1', float('nan')):.2e}), cross-document "
                       f"control {d['cross_vs_separate']:.2e} -> separates={d['separates']}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--plan", default="", help="CASE[:ROUNDS],... run in this order (cases of train_throughput)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--profile", default="", help="cases whose timed rounds are followed by a profiled pass")
    ap.add_argument("--profile-steps", type=int, default=6)
    ap.add_argument("--strong-attn", default="auto", choices=["auto", "flex_attention", "sdpa"])
    ap.add_argument("--strong-impl", default="auto", choices=["auto", "trl", "hf"])
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole plan's time, workers' start included")
    ap.add_argument("--min-first-s", type=float, default=40.0,
                    help="time per side a case's first round needs at least (imports, builds, compiles)")
    ap.add_argument("--run-timeout-s", type=float, default=240.0,
                    help="a timed run's limit (a warm-up's: twice this); a worker past it is killed and replaced")
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    ap.add_argument("--logs", default="/tmp/alternate-logs", help="folder for the workers' logs")
    ap.add_argument("--table", nargs="*", default=None, help="print the summary of these JSONL files and exit")
    a = ap.parse_args()
    if a.table is not None:
        rows = [json.loads(x) for f in a.table if Path(f).exists() for x in Path(f).read_text().splitlines()
                if x.strip()]
    else:
        rows = run_plan(a)
    print(summary(rows))


if __name__ == "__main__":
    main()
