"""The coordinator's Prometheus metrics, on a registry of its own (several apps may share a process
in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CoordinatorMetrics"]


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pd_coordinator_requests",
            "Generation requests by route, mode and final HTTP status",
            ["route", "mode", "status"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "pd_coordinator_decisions",
            "Scheduling decisions by decode endpoint and mode",
            ["decode", "mode"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pd_coordinator_in_flight",
            "Requests in flight per decode endpoint",
            ["decode"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "pd_coordinator_decision_seconds",
            "Time to make one scheduling decision",
            buckets=(1e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "pd_coordinator_request_seconds",
            "Time from arrival to the last byte sent",
            ["route"],
            registry=self.registry,
        )
        self.errors = Counter(
            "pd_coordinator_errors",
            "Requests answered with an error by the coordinator itself",
            ["type"],
            registry=self.registry,
        )
