"""Precise prefix-cache scorer: the share of the prompt's full blocks an endpoint already holds.

``ctx.cached_blocks`` comes from the KV-event index (blocks the engine said it stored and has not
removed) joined with requests routed there whose events have not arrived yet; the score is the
leading run of blocks held divided by the prompt's full blocks, so 1.0 means only the trailing
partial block needs computing. A prompt shorter than one block scores 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from pd_runtime.scheduling.plugins import SCORERS, EndpointState, RequestContext, Scorer, register


@register(SCORERS, "prefix-cache")
class PrefixCacheScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        total = len(ctx.block_keys)
        if not total:
            return {e.address: 0.0 for e in endpoints}
        cached = ctx.cached_blocks
        return {e.address: cached.get(e.address, 0) / total for e in endpoints}
