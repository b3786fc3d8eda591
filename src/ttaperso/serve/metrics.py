"""Prometheus metrics of one server (its own registry: several apps in one process stay apart)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Requests, latency, frames, adapted frames, guard trips, stale retries, store errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ttaperso_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "ttaperso_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.frames = Counter("ttaperso_frames", "Frames predicted", registry=r)
        self.adapted = Counter(
            "ttaperso_adapted_frames",
            "Frames that passed the gates and adapted a state",
            registry=r,
        )
        self.guard_trips = Counter("ttaperso_guard_trips", "Collapse-guard recoveries", registry=r)
        self.reloads = Counter(
            "ttaperso_stale_reloads",
            "Steps recomputed after the store held a newer version (another replica wrote)",
            registry=r,
        )
        self.store_errors = Counter("ttaperso_store_errors", "Store failures", ["kind"], registry=r)
        self.in_flight = Gauge("ttaperso_requests_in_flight", "Requests being served", registry=r)

    def observe_step(self, answer: dict[str, Any]) -> None:
        """Count one subject's step from its answer."""
        self.frames.inc(answer.get("frames", 0))
        self.adapted.inc(answer.get("adapted_frames", 0))
        self.guard_trips.inc(max(0, answer.get("guard_trips", 0)))
        self.reloads.inc(answer.get("reloads", 0))

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
