"""Drop endpoints that are saturated, unless every candidate is.

This is what turns prefix affinity into "stick, then spill over": the prefix-cache scorer keeps
sending a shared prefix to the endpoint that holds it, and once that endpoint has too many requests
of ours in flight, a waiting queue, or a nearly full KV cache, it drops out of the candidates for
a while and the next-best endpoint takes the overflow (and warms up). When all candidates are
saturated, filtering would only turn load into errors, so all of them stay (fail open); admission
control is the coordinator's job, not a filter's.
"""

from __future__ import annotations

from typing import Any

from pd_runtime.scheduling.plugins import FILTERS, EndpointState, Filter, RequestContext, register


@register(FILTERS, "not-saturated")
class NotSaturatedFilter(Filter):
    fail_open = True

    def __init__(
        self,
        *,
        max_in_flight: int | None = 8,
        max_waiting: float | None = 4,
        max_kv_usage: float | None = 0.9,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self.max_kv_usage = max_kv_usage

    def saturated(self, e: EndpointState) -> bool:
        return bool(
            (self.max_in_flight is not None and e.in_flight_requests >= self.max_in_flight)
            or (self.max_waiting is not None and (e.waiting or 0) > self.max_waiting)
            or (self.max_kv_usage is not None and (e.kv_usage or 0) > self.max_kv_usage)
        )

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        mi, mw, mk = self.max_in_flight, self.max_waiting, self.max_kv_usage
        if mi is None or mw is None or mk is None:
            return [e for e in endpoints if not self.saturated(e)]
        # saturated() inlined for the usual case (every limit set): no call per endpoint
        return [
            e
            for e in endpoints
            if not (e.in_flight_requests >= mi or (e.waiting or 0) > mw or (e.kv_usage or 0) > mk)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "max_in_flight": self.max_in_flight,
            "max_waiting": self.max_waiting,
            "max_kv_usage": self.max_kv_usage,
        }
