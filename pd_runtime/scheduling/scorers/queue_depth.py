"""Queue-depth scorer: fewer requests waiting in the engine (its ``vllm:num_requests_waiting``)
scores higher, min-max normalised over the candidates. Unscraped endpoints count as empty."""

from __future__ import annotations

from collections.abc import Sequence

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    min_max_inverse,
    register,
)


@register(SCORERS, "queue-depth")
class QueueDepthScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        return min_max_inverse({e.address: e.waiting or 0.0 for e in endpoints})
