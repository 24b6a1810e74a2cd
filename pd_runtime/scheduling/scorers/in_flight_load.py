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
        # One pass for the ranges, one for the scores (this runs per endpoint per decision).
        req_lo = min(e.in_flight_requests for e in endpoints)
        req_hi = max(e.in_flight_requests for e in endpoints)
        tok_lo = min(e.in_flight_tokens for e in endpoints)
        tok_hi = max(e.in_flight_tokens for e in endpoints)
        w_req, w_tok = 1.0 - self.token_share, self.token_share
        req_span, tok_span = req_hi - req_lo, tok_hi - tok_lo
        if not req_span and not tok_span:
            return dict.fromkeys((e.address for e in endpoints), 1.0)
        req_scale = w_req / req_span if req_span else 0.0
        tok_scale = w_tok / tok_span if tok_span else 0.0
        base = (0.0 if req_span else w_req) + (0.0 if tok_span else w_tok)
        return {
            e.address: base
            + (req_hi - e.in_flight_requests) * req_scale
            + (tok_hi - e.in_flight_tokens) * tok_scale
            for e in endpoints
        }

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "token_share": self.token_share}
