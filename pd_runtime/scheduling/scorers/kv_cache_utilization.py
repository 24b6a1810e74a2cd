"""KV-cache utilisation scorer: ``1 - vllm:kv_cache_usage_perc``, an absolute measure (a nearly
full cache is bad however full the others are: it will preempt or evict). Unscraped: 1."""

from __future__ import annotations

from collections.abc import Sequence

from pd_runtime.scheduling.plugins import SCORERS, EndpointState, RequestContext, Scorer, register


@register(SCORERS, "kv-cache-utilization")
class KVCacheUtilizationScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        scores = {}
        for e in endpoints:
            usage = e.kv_usage
            scores[e.address] = 1.0 if not usage or usage < 0 else 0.0 if usage >= 1 else 1 - usage
        return scores
