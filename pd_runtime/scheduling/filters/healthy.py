"""Drop endpoints whose metrics endpoint stopped answering (see ``EndpointState.healthy``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pd_runtime.scheduling.plugins import FILTERS, EndpointState, Filter, RequestContext, register

if TYPE_CHECKING:
    from pd_runtime.scheduling.table import BoolArray, EndpointTable


@register(FILTERS, "healthy")
class HealthyFilter(Filter):
    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.healthy]

    def filter_all(self, ctx: RequestContext, table: EndpointTable) -> BoolArray:
        return table.healthy
