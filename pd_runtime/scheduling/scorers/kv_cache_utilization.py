"""KV-cache utilisation scorer: ``1 - vllm:kv_cache_usage_perc``, an absolute measure (a nearly
full cache is bad however full the others are: it will preempt or evict). Unscraped: 1."""

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
    register,
)


def _scores(usages: list[float | None]) -> Scores:
    return np.array(
        [1.0 if not u or u < 0 else 0.0 if u >= 1 else 1 - u for u in usages], np.float64
    )


@register(SCORERS, "kv-cache-utilization")
class KVCacheUtilizationScorer(Scorer):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._memo = Memo("kv_usage", _scores)  # a scraped signal: same until the next scrape

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        return self._memo(endpoints)
