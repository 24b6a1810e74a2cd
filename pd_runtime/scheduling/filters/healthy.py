"""Drop endpoints whose metrics endpoint stopped answering (see ``EndpointState.healthy``)."""

from __future__ import annotations

from pd_runtime.scheduling.plugins import FILTERS, EndpointState, Filter, RequestContext, register


@register(FILTERS, "healthy")
class HealthyFilter(Filter):
    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.healthy]
