"""Queue-depth scorer: fewer requests waiting in the engine (its ``vllm:num_requests_waiting``)
scores higher, min-max normalised over the candidates. Unscraped endpoints count as empty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    Memo,
    RequestContext,
    Scorer,
    min_max_inverse,
    register,
)


def _scores(addresses: list[str], waiting: list[float | None]) -> dict[str, float]:
    return min_max_inverse({a: w or 0.0 for a, w in zip(addresses, waiting, strict=True)})


@register(SCORERS, "queue-depth")
class QueueDepthScorer(Scorer):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._memo = Memo("waiting", _scores)  # a scraped signal: same until the next scrape

    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        return self._memo(endpoints)
