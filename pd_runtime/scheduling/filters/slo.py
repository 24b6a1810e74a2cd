"""Keep the endpoints predicted to meet the request's latency targets.

Targets come from the request headers ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` or, when a header is
absent, from the filter's ``ttft_ms`` / ``tpot_ms`` parameters (a deployment-wide SLO); with no
target at all the filter keeps everyone and leaves no mark. Predictions come from the learned
latency model (:mod:`pd_runtime.scheduling.latency`): TTFT of serving the prompt on the endpoint
itself (its uncached tokens plus the prefills queued there) and TPOT at its batch with this request
added. An endpoint with too few samples (cold) is kept: unknown is not slow. Either way the
predicted TTFT is at least the wait of the endpoint's oldest request still without a first token
(a new request queues behind it): a stalled endpoint fails a TTFT target before its line knows.

When none is predicted to meet the targets, the filter keeps the one with the most headroom
(the largest ``min over targets of (target - predicted) / target``, i.e. the least relative
miss) rather than failing the request, and marks the decision ``slo: "unmet"`` (the decision
line's field and the ``pd_coordinator_slo_unmet_total`` counter); otherwise ``slo: "met"``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from pd_runtime.scheduling.plugins import FILTERS, EndpointState, Filter, RequestContext, register

TTFT_HEADER = "x-slo-ttft-ms"
TPOT_HEADER = "x-slo-tpot-ms"


def _target(headers: dict[str, str], name: str, default: float | None) -> float | None:
    raw = headers.get(name)
    if raw is not None:
        with contextlib.suppress(ValueError):
            value = float(raw)
            if value > 0:
                return value / 1000.0
    return default


@register(FILTERS, "slo")
class SLOFilter(Filter):
    def __init__(
        self, *, ttft_ms: float | None = None, tpot_ms: float | None = None, **params: Any
    ) -> None:
        super().__init__(**params)
        for name, value in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
            if value is not None and value <= 0:
                raise ValueError(f"slo: {name} must be > 0")
        self.ttft_ms = ttft_ms
        self.tpot_ms = tpot_ms

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        headers = ctx.request.headers
        ttft = _target(headers, TTFT_HEADER, self.ttft_ms / 1000.0 if self.ttft_ms else None)
        tpot = _target(headers, TPOT_HEADER, self.tpot_ms / 1000.0 if self.tpot_ms else None)
        model = ctx.latency
        if (ttft is None and tpot is None) or model is None or not endpoints:
            return endpoints
        kept: list[EndpointState] = []
        best: EndpointState | None = None
        best_headroom = float("-inf")
        now = time.monotonic()
        for e in endpoints:
            headroom = float("inf")
            if ttft is not None:
                predicted = model.ttft_bound(
                    e.address, ctx.prefill_work(e), e.first_token_wait(now)
                )
                if predicted > 0:
                    headroom = (ttft - predicted) / ttft
            if tpot is not None and model.warm_tpot(e.address):
                predicted = model.tpot(e.address, e.in_flight_requests + 1)
                headroom = min(headroom, (tpot - predicted) / tpot)
            if headroom >= 0:
                kept.append(e)
            if headroom > best_headroom:
                best, best_headroom = e, headroom
        if kept:
            ctx.slo = "met"
            return kept
        ctx.slo = "unmet"
        assert best is not None
        return [best]

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms}
