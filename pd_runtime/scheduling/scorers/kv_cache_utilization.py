"""KV-cache utilisation scorer: ``1 - vllm:kv_cache_usage_perc``, an absolute measure (a nearly
full cache is bad however full the others are: it will preempt or evict). Unscraped: 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    Memo,
    RequestContext,
    Scorer,
    register,
)


def _scores(addresses: list[str], usages: list[float | None]) -> dict[str, float]:
    scores = {}
    for address, usage in zip(addresses, usages, strict=True):
        scores[address] = 1.0 if not usage or usage < 0 else 0.0 if usage >= 1 else 1 - usage
    return scores


@register(SCORERS, "kv-cache-utilization")
class KVCacheUtilizationScorer(Scorer):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._memo = Memo("kv_usage", _scores)  # a scraped signal: same until the next scrape

    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        return self._memo(endpoints)
