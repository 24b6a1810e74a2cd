"""In-flight load scorer: the coordinator's own count of requests and tokens (prompt + max new
tokens) in flight per endpoint, min-max normalised and averaged.

Scraped metrics are an interval old; during a burst every request of the burst would see the
same numbers and herd onto one endpoint. These counts change the moment a request is routed, so
the burst's second request already sees the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    min_max_inverse,
    register,
)


@register(SCORERS, "in-flight-load")
class InFlightLoadScorer(Scorer):
    def __init__(self, *, token_share: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        if not 0.0 <= token_share <= 1.0:
            raise ValueError(f"in-flight-load: token_share must be in [0, 1], got {token_share}")
        self.token_share = token_share

    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        requests = min_max_inverse({e.address: float(e.in_flight_requests) for e in endpoints})
        tokens = min_max_inverse({e.address: float(e.in_flight_tokens) for e in endpoints})
        w = self.token_share
        return {a: (1 - w) * requests[a] + w * tokens[a] for a in requests}

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "token_share": self.token_share}
