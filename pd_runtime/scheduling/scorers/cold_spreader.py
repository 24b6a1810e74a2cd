"""Cold-request spreader: a request whose prompt is cached nowhere goes where the fewest new
prefixes have gone lately.

Prefix affinity makes each endpoint the home of the prefixes it first served. If cold requests
followed load alone, a momentarily idle endpoint would collect the homes of many new prefixes at
once and become the next hot spot. The spreader keeps an exponentially decaying count of cold
requests per endpoint (half-life ``half_life_requests`` cold requests) and scores the least-used
highest. Requests with a hit on some candidate score 1.0 everywhere (the spreader stays out of their
way); "cold" is judged among the profile's own candidates, so a prompt that only a prefill worker
holds is still cold for the choice of a decode worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Any

import numpy as np

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    Scores,
    addresses,
    min_max_inverse_array,
    register,
)


@register(SCORERS, "cold-spreader")
class ColdSpreaderScorer(Scorer):
    def __init__(self, *, half_life_requests: float = 16.0, **params: Any) -> None:
        super().__init__(**params)
        if half_life_requests <= 0:
            raise ValueError("cold-spreader: half_life_requests must be > 0")
        self.half_life_requests = half_life_requests
        self._decay = 0.5 ** (1.0 / half_life_requests)
        self._homes: dict[str, float] = {}
        self._cold: tuple[RequestContext, bool] | None = None  # the last score() call's verdict

    @staticmethod
    def is_cold(ctx: RequestContext, endpoints: Sequence[EndpointState]) -> bool:
        return not any(map(ctx.cached_blocks.get, addresses(endpoints)))

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        addrs = addresses(endpoints)
        cold = not any(map(ctx.cached_blocks.get, addrs)) if ctx.cached_blocks else True
        self._cold = (ctx, cold)
        if not cold:
            return np.ones(len(addrs))
        homes = map(self._homes.get, addrs, repeat(0.0))
        return min_max_inverse_array(np.fromiter(homes, np.float64, len(addrs)))

    def picked(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        last, self._cold = self._cold, None
        cold = last[1] if last is not None and last[0] is ctx else self.is_cold(ctx, [endpoint])
        if not cold or not ctx.block_keys:
            return
        for address in self._homes:
            self._homes[address] *= self._decay
        self._homes[endpoint.address] = self._homes.get(endpoint.address, 0.0) + 1.0

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "half_life_requests": self.half_life_requests}
