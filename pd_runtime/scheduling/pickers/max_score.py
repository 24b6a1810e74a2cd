"""Pick the highest total score; break ties (within ``tolerance``) uniformly at random.

A deterministic tie-break (first in the list) sends every request of a burst that sees equal
scores to the same endpoint; a random one spreads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress, repeat
from operator import ge
from typing import Any

from pd_runtime.scheduling.plugins import (
    PICKERS,
    EndpointState,
    Picker,
    RequestContext,
    addresses,
    register,
)


@register(PICKERS, "max-score")
class MaxScorePicker(Picker):
    def __init__(self, *, tolerance: float = 1e-9, **params: Any) -> None:
        super().__init__(**params)
        self.tolerance = tolerance

    def pick(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: dict[str, float]
    ) -> EndpointState:
        values = list(map(totals.__getitem__, addresses(endpoints)))
        best = max(values)
        top = list(compress(endpoints, map(ge, values, repeat(best - self.tolerance))))
        return top[0] if len(top) == 1 else ctx.rng.choice(top)
