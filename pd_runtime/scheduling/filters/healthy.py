"""Drop endpoints whose metrics endpoint stopped answering (see ``EndpointState.healthy``)."""

from __future__ import annotations

from itertools import compress
from operator import attrgetter

from pd_runtime.scheduling.plugins import FILTERS, EndpointState, Filter, RequestContext, register

_healthy = attrgetter("healthy")


@register(FILTERS, "healthy")
class HealthyFilter(Filter):
    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return list(compress(endpoints, map(_healthy, endpoints)))
