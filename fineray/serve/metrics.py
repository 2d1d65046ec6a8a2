"""Prometheus metrics of the server, per adapter, gathered from every replica into one registry.

Ingress and model replicas are separate processes; each buffers its events (`EventBuffer`) and flushes
them to one `MetricsHub` deployment that owns a `ServeMetrics` registry, so `/metrics` on any ingress
replica shows cluster-wide totals. Labels: `adapter` (name, or `base`), `version` (`v3`, or empty for the
base); requests rejected before a model was resolved carry `adapter="-"`.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "EventBuffer", "ServeMetrics", "request_event"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The metric families, in a private registry (no process-global collectors)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        av = ["adapter", "version"]
        self.requests = Counter("fineray_requests", "Requests by adapter, endpoint and HTTP status",
                                [*av, "endpoint", "status"], registry=r)
        self.errors = Counter("fineray_request_errors", "Failed requests by adapter, status and error code",
                              [*av, "status", "code"], registry=r)
        self.prompt_tokens = Counter("fineray_prompt_tokens", "Prompt tokens processed", av, registry=r)
        self.completion_tokens = Counter("fineray_completion_tokens", "Completion tokens generated", av, registry=r)
        self.latency = Histogram("fineray_request_latency_seconds", "End-to-end request latency",
                                 [*av, "endpoint"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("fineray_time_to_first_token_seconds", "Time to the first streamed token",
                              av, buckets=_LATENCY, registry=r)
        self.rollout = Counter("fineray_rollout_requests", "Requests per rollout variant",
                               ["rollout", "variant"], registry=r)
        self.loads = Counter("fineray_adapter_loads", "Adapter loads on model replicas", av, registry=r)
        self.evictions = Counter("fineray_adapter_evictions", "Adapter evictions (LRU) on model replicas",
                                 av, registry=r)
        self.load_seconds = Histogram("fineray_adapter_load_seconds", "Adapter load time", av,
                                      buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram("fineray_batch_rows", "Sequences per forward pass", ["kind"],
                                    buckets=_ROWS, registry=r)
        self.batch_adapters = Histogram("fineray_batch_adapters", "Distinct adapters (base counts) per forward pass",
                                        ["kind"], buckets=_ROWS, registry=r)
        # Feedback (`POST /v1/feedback`) per adapter version and rollout variant: ratings in [-1, 1] counted
        # by sign and summed (mean rating = rating_sum / ratings), and how many came with a correction. (A
        # histogram would not do: Prometheus clients drop `_sum` when a bucket bound is negative.)
        fv = [*av, "rollout", "variant"]
        self.feedback = Counter("fineray_feedback_ratings", "Feedback ratings by sign", [*fv, "sentiment"],
                                registry=r)
        self.rating_sum = Gauge("fineray_feedback_rating_sum", "Sum of feedback ratings (-1 bad .. 1 good)", fv,
                                registry=r)
        self.corrections = Counter("fineray_feedback_corrections", "Feedback that came with a correction", fv,
                                   registry=r)
        self.step_seconds = Histogram("fineray_forward_seconds", "Forward pass time", ["kind"],
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                      registry=r)

    def apply(self, events: list[dict[str, Any]]) -> None:
        """Fold events (dicts with an `event` key) into the metrics."""
        for e in events:
            kind = e.get("event")
            av = (e.get("adapter", "-"), e.get("version", ""))
            if kind == "request":
                status = int(e["status"])
                self.requests.labels(*av, e.get("endpoint", ""), str(status)).inc()
                if status >= 400:
                    self.errors.labels(*av, str(status), e.get("code") or "").inc()
                if e.get("prompt_tokens"):
                    self.prompt_tokens.labels(*av).inc(e["prompt_tokens"])
                if e.get("completion_tokens"):
                    self.completion_tokens.labels(*av).inc(e["completion_tokens"])
                if e.get("latency_s") is not None:
                    self.latency.labels(*av, e.get("endpoint", "")).observe(e["latency_s"])
                if e.get("ttft_s") is not None:
                    self.ttft.labels(*av).observe(e["ttft_s"])
                if e.get("rollout"):
                    self.rollout.labels(e["rollout"], e.get("variant", "")).inc()
            elif kind == "load":
                self.loads.labels(*av).inc()
                self.load_seconds.labels(*av).observe(e.get("seconds", 0.0))
            elif kind == "feedback":
                v = e.get("version")
                labels = (e.get("adapter", "-"), f"v{v}" if v else "", e.get("rollout") or "", e.get("variant") or "")
                rating = float(e["rating"])
                sentiment = "positive" if rating > 0 else "negative" if rating < 0 else "neutral"
                self.feedback.labels(*labels, sentiment).inc()
                self.rating_sum.labels(*labels).inc(rating)
                if e.get("correction"):
                    self.corrections.labels(*labels).inc()
            elif kind == "evict":
                self.evictions.labels(*av).inc()
            elif kind == "steps":  # aggregated forward passes: [(kind, rows, adapters, seconds), ...]
                for k, rows, adapters, secs in e["steps"]:
                    self.batch_rows.labels(k).observe(rows)
                    self.batch_adapters.labels(k).observe(adapters)
                    self.step_seconds.labels(k).observe(secs)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)


class EventBuffer:
    """Thread-safe list of pending metric events (flushed to the hub in batches)."""

    def __init__(self, max_steps: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._steps: list[tuple[str, int, int, float]] = []
        self._max_steps = max_steps

    def add(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def step(self, kind: str, rows: int, adapters: int, seconds: float) -> None:
        with self._lock:
            if len(self._steps) < self._max_steps:  # bounded if the hub is unreachable for a while
                self._steps.append((kind, rows, adapters, seconds))

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            events, self._events = self._events, []
            if self._steps:
                events.append({"event": "steps", "steps": self._steps})
                self._steps = []
        return events


def request_event(adapter: str, version: int | None, endpoint: str, status: int, **extra: Any) -> dict[str, Any]:
    """A `request` event with the standard labels."""
    return {"event": "request", "adapter": adapter, "version": f"v{version}" if version else "",
            "endpoint": endpoint, "status": status, **extra}
