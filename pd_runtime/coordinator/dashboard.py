"""The coordinator's live dashboard: ``GET /dashboard`` (a static page) and ``GET
/dashboard/state`` (the JSON it polls every 1.5 s).

Where each number comes from (nothing here runs per request; all of it runs per poll)::

    scheduler.debug_state()  ──▶ endpoints: role, address, healthy, waiting/running, KV usage
                                 (kv-aware: from its scraper; round-robin tracks none: null),
                                 the learned TTFT/TPOT model when the policy times answers
    metrics.registry (the ───▶ MetricsWindow.poll() ──▶ totals: exactly what /metrics says now
      same objects /metrics       readings kept ~1 s apart ──▶ rates over the last 10 s,
      renders)                    for 60 s                      percentiles over the last 60 s,
                                                                the latest decisions (what the
                                                                decision counter gained between
                                                                two readings)

The page, its script and its stylesheet ship in ``pd_runtime/coordinator/static/`` (package
data: no CDN, works offline) and hold no data, so they are served without an API key
(:data:`PAGE_PATHS`, like ``/health``); the state names every endpoint's address, so with API
keys on it needs one like every other path (the page asks for it on a 401).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from pd_runtime.coordinator.metrics import CoordinatorMetrics
from pd_runtime.coordinator.metrics_window import (
    MetricsWindow,
    Reading,
    bucket_delta,
    histogram_quantile,
)
from pd_runtime.scheduling.base import Scheduler

__all__ = ["PAGE_PATHS", "STATE_PATH", "Dashboard", "add_dashboard_routes"]

#: Path → (file in ``static/``, content type): the page and its assets, served without a key.
_ASSETS = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(_ASSETS)
STATE_PATH = "/dashboard/state"

#: Only what the page itself ships may load: no CDN, no inline script.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:",
    "cache-control": "no-cache",
}

SPAN_S = 60.0  # percentiles and the prefix hit ratio "lately"
RATE_S = 10.0  # per-second rates
RECENT = 20  # rows of the latest decisions
QUANTILES = (0.5, 0.9, 0.99)

DECISIONS = "pd_coordinator_decisions_total"
REQUESTS = "pd_coordinator_requests_total"
_PROMPT = ("pd_coordinator_prompt_tokens_total", "pd_coordinator_cached_prompt_tokens_total")


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _latency(now: Reading, then: Reading, histogram: str) -> dict[str, Any]:
    """Observations of ``histogram`` between two readings: count, mean and quantiles (seconds)."""
    count = now.total(f"{histogram}_count") - then.total(f"{histogram}_count")
    seconds = now.total(f"{histogram}_sum") - then.total(f"{histogram}_sum")
    buckets = bucket_delta(now.buckets(histogram), then.buckets(histogram))
    out: dict[str, Any] = {"count": count, "mean": _ratio(seconds, count)}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = histogram_quantile(q, buckets)
    return out


class Dashboard:
    """Builds the state the page shows from the scheduler and the coordinator's metrics."""

    def __init__(self, scheduler: Scheduler, metrics: CoordinatorMetrics) -> None:
        self.scheduler = scheduler
        self.window = MetricsWindow(metrics.registry, span_s=SPAN_S)
        # A reading of the counters as they start (zero): until the coordinator is SPAN_S old,
        # the first poll's window then reaches back to the start instead of being empty.
        self.window.poll()

    def state(self) -> dict[str, Any]:
        now = self.window.poll()
        span = self.window.since(now, SPAN_S)
        recent = self.window.since(now, RATE_S)
        rate_s = now.at - recent.at
        debug = self.scheduler.debug_state()

        def per_s(name: str, **labels: str) -> float | None:
            if rate_s <= 0:
                return None
            return (now.total(name, **labels) - recent.total(name, **labels)) / rate_s

        decisions = now.by(DECISIONS, "mode", "reason")
        prompt_now, cached_now = (now.total(name) for name in _PROMPT)
        prompt_span, cached_span = (now.total(name) - span.total(name) for name in _PROMPT)
        return {
            "time": now.wall,
            "policy": debug.get("policy", type(self.scheduler).__name__),
            "window": {"span_s": now.at - span.at, "rate_s": rate_s},
            "endpoints": self._endpoints(debug, now),
            "requests": {
                "total": now.total(REQUESTS),
                "per_s": per_s(REQUESTS),
                "by_status": {s: v for (s,), v in now.by(REQUESTS, "status").items()},
                "admitted": now.total("pd_coordinator_admitted"),
                "queued": now.total("pd_coordinator_queued"),
                "errors": now.total("pd_coordinator_errors_total"),
                "retries": now.total("pd_coordinator_retries_total"),
                "rejected": now.total("pd_coordinator_rejected_total"),
            },
            "decisions": {
                "total": now.total(DECISIONS),
                "per_s": per_s(DECISIONS),
                "by_mode_reason": [
                    {
                        "mode": mode,
                        "reason": reason,
                        "total": total,
                        "per_s": per_s(DECISIONS, mode=mode, reason=reason),
                    }
                    for (mode, reason), total in sorted(decisions.items())
                ],
                "slo_unmet": now.total("pd_coordinator_slo_unmet_total"),
            },
            "prefix": {
                "prompt_tokens": prompt_now,
                "cached_tokens": cached_now,
                "hit_ratio": _ratio(cached_now, prompt_now),
                "hit_ratio_span": _ratio(cached_span, prompt_span),
            },
            "latency": {
                "ttft_seconds": _latency(now, span, "pd_coordinator_ttft_seconds"),
                "tpot_seconds": _latency(now, span, "pd_coordinator_tpot_seconds"),
                "request_seconds": _latency(now, span, "pd_coordinator_request_seconds"),
                "decision_seconds": _latency(now, span, "pd_coordinator_decision_seconds"),
                "learned": self._learned(debug),
            },
            "recent": self._recent(),
        }

    def _endpoints(self, debug: dict[str, Any], now: Reading) -> list[dict[str, Any]]:
        in_flight = {d: v for (d,), v in now.by("pd_coordinator_in_flight", "decode").items()}
        by_decode = {d: v for (d,), v in now.by(DECISIONS, "decode").items()}
        total_decisions = sum(by_decode.values())
        rows = []
        for e in debug.get("endpoints", []):
            name, decode = e["name"], e["role"] == "decode"
            decided = by_decode.get(name, 0.0) if decode else None
            rows.append(
                {
                    "name": name,
                    "role": e["role"],
                    "address": e["address"],
                    # None: the policy does not track health (round-robin scrapes nothing).
                    "healthy": e.get("healthy"),
                    "in_flight": in_flight.get(name, 0.0) if decode else None,
                    "waiting": e.get("waiting"),
                    "running": e.get("running"),
                    "kv_usage": e.get("kv_usage"),
                    "scrape_failures": e.get("scrape_failures"),
                    "decisions": decided,
                    "share": _ratio(decided, total_decisions) if decided is not None else None,
                }
            )
        return rows

    def _learned(self, debug: dict[str, Any]) -> dict[str, Any] | None:
        """The latency model per endpoint (``TTFT ≈ c + a·tokens``, ``TPOT ≈ b + k·requests``)
        when the policy times answers; None otherwise (the coordinator then times nothing)."""
        if not self.scheduler.times_answers:
            return None
        return dict(debug.get("latency") or {})

    def _recent(self) -> list[dict[str, Any]]:
        """What the decision counter gained between consecutive kept readings, newest first."""
        rows: list[dict[str, Any]] = []
        for earlier, later in self.window.pairs():
            before = earlier.by(DECISIONS, "decode", "mode", "reason")
            after = later.by(DECISIONS, "decode", "mode", "reason")
            for (decode, mode, reason), count in sorted(after.items()):
                gained = count - before.get((decode, mode, reason), 0.0)
                if gained > 0:
                    rows.append(
                        {
                            "time": later.wall,
                            "seconds": later.at - earlier.at,
                            "decode": decode,
                            "mode": mode,
                            "reason": reason,
                            "count": gained,
                        }
                    )
        return rows[::-1][:RECENT]


def _page(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    """A handler serving ``static/name``, read once (the files ship with the package)."""
    body = resources.files("pd_runtime.coordinator").joinpath("static", name).read_bytes()

    async def page() -> Response:
        return Response(body, media_type=media_type, headers=_PAGE_HEADERS)

    return page


def add_dashboard_routes(app: FastAPI, scheduler: Scheduler, metrics: CoordinatorMetrics) -> None:
    """Register the page, its assets and the state route on the coordinator's app."""
    dashboard = Dashboard(scheduler, metrics)
    app.state.dashboard = dashboard

    for path, (name, media_type) in _ASSETS.items():
        app.add_api_route(path, _page(name, media_type), methods=["GET"], include_in_schema=False)

    @app.get(STATE_PATH, include_in_schema=False)
    async def dashboard_state() -> JSONResponse:
        return JSONResponse(dashboard.state(), headers={"cache-control": "no-store"})
