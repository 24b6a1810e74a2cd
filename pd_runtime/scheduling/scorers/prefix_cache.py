"""Precise prefix-cache scorer: the share of the prompt's full blocks an endpoint already holds.

``ctx.cached_blocks`` comes from the KV-event index (blocks the engine said it stored and has not
removed) joined with requests routed there whose events have not arrived yet; the score is the
leading run of blocks held divided by the prompt's full blocks, so 1.0 means only the trailing
partial block needs computing. A prompt shorter than one block scores 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import truediv

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    addresses,
    register,
)


@register(SCORERS, "prefix-cache")
class PrefixCacheScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        total = len(ctx.block_keys)
        addrs = addresses(endpoints)
        if not total:
            return dict.fromkeys(addrs, 0.0)
        held = map(ctx.cached_blocks.get, addrs, repeat(0))
        return dict(zip(addrs, map(truediv, held, repeat(total)), strict=True))  # held / total
