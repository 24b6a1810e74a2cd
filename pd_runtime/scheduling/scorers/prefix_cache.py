"""Precise prefix-cache scorer: the share of the prompt's full blocks an endpoint already holds.

``ctx.cached_blocks`` comes from the KV-event index (blocks the engine said it stored and has not
removed) joined with requests routed there whose events have not arrived yet; the score is the
leading run of blocks held divided by the prompt's full blocks, so 1.0 means only the trailing
partial block needs computing. A prompt shorter than one block scores 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter

import numpy as np

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    Scores,
    register,
)

_address = attrgetter("address")


@register(SCORERS, "prefix-cache")
class PrefixCacheScorer(Scorer):
    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        total = len(ctx.block_keys)
        n = len(endpoints)
        if not total or not ctx.cached_blocks:
            return np.zeros(n)
        held = map(ctx.cached_blocks.get, map(_address, endpoints), repeat(0))
        return np.fromiter(held, np.float64, n) / total
