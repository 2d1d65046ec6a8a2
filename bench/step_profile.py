"""GPU busy time per training step vs wall time per step (issue 17), for any of the bench's sides.

`StepProfiler.on_step(n)` is called after step n has finished and the GPU is in sync (the sides' clocks do
that: a loss read-out or `torch.cuda.synchronize()`). It starts torch.profiler (CUDA activity only: kernels,
copies and memsets, no CPU op tracing, to keep its own overhead small) after step `start_after` and stops it
after `steps` more steps. Between those two points every GPU activity belongs to those steps, so

  * busy per step = the union of all GPU activity intervals (streams may overlap) / steps;
  * wall per step = perf_counter between the two points / steps (the profiled pass: CUPTI adds a little per
    launch; compare with the unprofiled timed runs' wall per step, reported beside it);
  * idle = wall - busy: host work the GPU waits for (Python, launches, syncs, allocator, data).

Kernels are also grouped by kind (GEMM, attention, Triton-generated, elementwise/reduction, copies) with their
launch counts: what a faster step would have to take. On CPU (tests) the CPU ops stand in for kernels.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

__all__ = ["StepProfiler", "kernel_kind", "summarize_intervals"]

_KINDS = [  # first match wins; names as CUPTI reports them on Hopper with torch 2.11 / CUDA 13
    ("attention", re.compile(r"flash|fmha|attention|flex|varlen|_attn", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_|wgmma|splitk", re.IGNORECASE)),
    ("triton", re.compile(r"^triton_|^_?liger|_kernel$", re.IGNORECASE)),
    ("copy", re.compile(r"memcpy|memset|copy_|cat|fill", re.IGNORECASE)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|softmax|norm|index|scatter|gather", re.IGNORECASE)),
]


def kernel_kind(name: str) -> str:
    for kind, pat in _KINDS:
        if pat.search(name):
            return kind
    return "other"


def summarize_intervals(intervals: list[tuple[int, int, str]]) -> dict[str, Any]:
    """Union length (ns) of (start, end, name) intervals, and time / count per kind and per name."""
    busy, cur_s, cur_e = 0, None, None
    for s, e, _ in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    kinds: dict[str, list[float]] = {}
    names: dict[str, list[float]] = {}
    for s, e, n in intervals:
        for table, key in ((kinds, kernel_kind(n)), (names, n[:90])):
            row = table.setdefault(key, [0.0, 0])
            row[0] += e - s
            row[1] += 1
    return {"busy_ns": busy, "kinds": kinds, "names": names, "launches": len(intervals)}


class StepProfiler:
    """Profiles steps start_after+1 .. start_after+steps of a run; `result` holds the summary afterwards."""

    def __init__(self, start_after: int, steps: int, device: str) -> None:
        self.start_after, self.steps, self.device = start_after, steps, device
        self.result: dict[str, Any] | None = None
        self._prof: Any = None
        self._t0 = 0.0

    def on_step(self, done: int) -> None:
        if done == self.start_after and self._prof is None and self.result is None:
            from torch.profiler import ProfilerActivity, profile

            act = ProfilerActivity.CUDA if self.device == "cuda" else ProfilerActivity.CPU
            self._prof = profile(activities=[act])
            self._prof.start()
            self._t0 = time.perf_counter()
        elif self._prof is not None and done == self.start_after + self.steps:
            wall = time.perf_counter() - self._t0
            self._prof.stop()
            self.result = self._summary(self._prof, wall)
            self._prof = None

    def _summary(self, prof: Any, wall_s: float) -> dict[str, Any]:
        want = torch.autograd.DeviceType.CUDA if self.device == "cuda" else torch.autograd.DeviceType.CPU
        iv = []
        for ev in prof.profiler.kineto_results.events():
            if ev.device_type() != want or ev.duration_ns() <= 0:
                continue
            if self.device != "cuda" and not ev.name().startswith("aten::"):
                continue
            iv.append((ev.start_ns(), ev.end_ns(), ev.name()))
        s = summarize_intervals(iv)  # CPU ops nest (aten::matmul holds aten::mm): the union handles that
        n = self.steps
        busy = s["busy_ns"] / 1e9
        top = sorted(s["names"].items(), key=lambda kv: -kv[1][0])[:12]
        return {"steps": n, "wall_ms_per_step": 1e3 * wall_s / n, "gpu_busy_ms_per_step": 1e3 * busy / n,
                "gpu_busy_fraction": busy / wall_s if wall_s > 0 else None,
                "launches_per_step": s["launches"] / n,
                "kinds_ms_per_step": {k: round(1e3 * v[0] / 1e9 / n, 3) for k, v in
                                      sorted(s["kinds"].items(), key=lambda kv: -kv[1][0])},
                "kinds_launches_per_step": {k: round(v[1] / n, 1) for k, v in s["kinds"].items()},
                "top_kernels_ms_per_step": [[name, round(1e3 * v[0] / 1e9 / n, 3), round(v[1] / n, 1)]
                                            for name, v in top],
                "timer": "cuda" if self.device == "cuda" else "cpu-ops (stand-in)"}
