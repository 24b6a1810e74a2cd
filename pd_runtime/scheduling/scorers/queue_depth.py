"""Queue-depth scorer: fewer requests waiting in the engine (its ``vllm:num_requests_waiting``)
scores higher, min-max normalised over the candidates. Unscraped endpoints count as empty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    min_max_inverse,
    register,
)

if TYPE_CHECKING:
    from pd_runtime.scheduling.table import EndpointTable, FloatArray


@register(SCORERS, "queue-depth")
class QueueDepthScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        return min_max_inverse({e.address: e.waiting or 0.0 for e in endpoints})

    def score_all(self, ctx: RequestContext, table: EndpointTable) -> FloatArray:
        from pd_runtime.scheduling.table import min_max_inverse_array

        return table.memo(self, lambda: min_max_inverse_array(table.waiting))
