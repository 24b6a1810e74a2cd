"""Queue-depth scorer: fewer requests waiting in the engine (its ``vllm:num_requests_waiting``)
scores higher, min-max normalised over the candidates. Unscraped endpoints count as empty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    Memo,
    RequestContext,
    Scorer,
    Scores,
    min_max_inverse_array,
    register,
)


def _scores(waiting: list[float | None]) -> Scores:
    return min_max_inverse_array(np.array([w or 0.0 for w in waiting], np.float64))


@register(SCORERS, "queue-depth")
class QueueDepthScorer(Scorer):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._memo = Memo("waiting", _scores)  # a scraped signal: same until the next scrape

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        return self._memo(endpoints)
