"""The coordinator's Prometheus metrics, on a registry of its own (several apps may share a process
in tests)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pd_runtime.scheduling.base import SchedulingResult

__all__ = ["CoordinatorMetrics"]

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


def _children(metric: _Metric) -> Callable[..., _Metric]:
    """``metric.labels`` remembered per label values (bounded: a runaway label is a bug, and the
    oldest children are then looked up again, not lost)."""
    return lru_cache(maxsize=4096)(metric.labels)


_FAST = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
#: TTFT and time per token: 1 ms (a stand-in engine) to a minute (a long prefill on a busy worker).
_ANSWER = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
            "Scheduling decisions by decode endpoint, mode (disaggregated or direct) and reason",
            ["decode", "mode", "reason"],
            registry=self.registry,
        )
        self.slo_unmet = Counter(
            "pd_coordinator_slo_unmet",
            "Scheduling decisions for requests with latency targets (x-slo-ttft-ms, "
            "x-slo-tpot-ms or the slo filter's) that no endpoint was predicted to meet",
            registry=self.registry,
        )
        self.decision_lines_skipped = Counter(
            "pd_coordinator_decision_lines_skipped",
            "Decisions whose 'Got pod scores' line was not written (over decision_log_per_s)",
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "pd_coordinator_prompt_tokens",
            "Prompt tokens of scheduled requests (tokenized ones only)",
            registry=self.registry,
        )
        self.cached_prompt_tokens = Counter(
            "pd_coordinator_cached_prompt_tokens",
            "Of those, tokens the chosen decode endpoint already held (the prefix hit ratio is "
            "this over pd_coordinator_prompt_tokens_total)",
            registry=self.registry,
        )
        self.prefix_hit_ratio = Histogram(
            "pd_coordinator_prefix_hit_ratio",
            "Per request: share of the prompt the chosen decode endpoint already held",
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=self.registry,
        )
        self.prepare_seconds = Histogram(
            "pd_coordinator_prepare_seconds",
            "Time to prepare a request for scheduling (tokenization, block keys)",
            buckets=_FAST,
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
            "Time to make one scheduling decision (tokenization excluded)",
            buckets=_FAST,
            registry=self.registry,
        )
        self.ttft_seconds = Histogram(
            "pd_coordinator_ttft_seconds",
            "Streamed answers: forwarding the request to the first chunk back (the TTFT the "
            "gateway sees, its own hop excluded)",
            buckets=_ANSWER,
            registry=self.registry,
        )
        self.tpot_seconds = Histogram(
            "pd_coordinator_tpot_seconds",
            "Streamed answers that ended well: mean time per SSE event after the first chunk "
            "(one event per token as vLLM streams); counted per chunk received unless the "
            "scheduler parses events for its latency model",
            buckets=_ANSWER,
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
        self.retries = Counter(
            "pd_coordinator_retries",
            "Generation requests sent to another decode endpoint after the previous one failed "
            "before any byte reached the client, by reason: connect_error, timeout, "
            "transport_error or status_502/503/504",
            ["reason"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "pd_coordinator_rejected",
            "Generation requests refused by admission control (429), by reason: queue_full, "
            "displaced (by a higher-priority request) or queue_timeout",
            ["reason"],
            registry=self.registry,
        )
        self.admitted = Gauge(
            "pd_coordinator_admitted",
            "Generation requests holding an admission slot (at most max_in_flight)",
            registry=self.registry,
        )
        self.queued = Gauge(
            "pd_coordinator_queued",
            "Generation requests waiting for an admission slot (at most max_queued)",
            registry=self.registry,
        )

        # labels() checks the values and takes the metric's lock on every call (~5 µs here);
        # the per-request series keep their children instead. Their label values are few
        # (routes, modes, statuses, endpoint names) and no series is ever removed.
        self.requests_of = _children(self.requests)
        self.request_seconds_of = _children(self.request_seconds)
        self.in_flight_of = _children(self.in_flight)
        self._decisions_of = _children(self.decisions)

    def record_decision(self, result: SchedulingResult, mode: str) -> None:
        self._decisions_of(result.decode.name, mode, result.reason or "policy").inc()
        if result.slo == "unmet":
            self.slo_unmet.inc()
        if result.prompt_tokens is not None and result.cached_tokens is not None:
            self.prompt_tokens.inc(result.prompt_tokens)
            self.cached_prompt_tokens.inc(result.cached_tokens)
            if result.prompt_tokens:
                self.prefix_hit_ratio.observe(result.cached_tokens / result.prompt_tokens)
