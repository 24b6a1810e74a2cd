"""KV-cache utilisation scorer: ``1 - vllm:kv_cache_usage_perc``, an absolute measure (a nearly
full cache is bad however full the others are: it will preempt or evict). Unscraped: 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pd_runtime.scheduling.plugins import SCORERS, EndpointState, RequestContext, Scorer, register

if TYPE_CHECKING:
    from pd_runtime.scheduling.table import EndpointTable, FloatArray


@register(SCORERS, "kv-cache-utilization")
class KVCacheUtilizationScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        scores = {}
        for e in endpoints:
            usage = e.kv_usage
            scores[e.address] = 1.0 if not usage or usage < 0 else 0.0 if usage >= 1 else 1 - usage
        return scores

    def score_all(self, ctx: RequestContext, table: EndpointTable) -> FloatArray:
        def compute() -> FloatArray:
            usage = table.kv_usage  # None is 0 there
            out: FloatArray = np.where(usage <= 0, 1.0, np.where(usage >= 1, 0.0, 1 - usage))
            return out

        return table.memo(self, compute)
