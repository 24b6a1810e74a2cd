"""In-flight load scorer: the coordinator's own count of requests and tokens (prompt + max new
tokens) in flight per endpoint, min-max normalised and averaged.

Scraped metrics are an interval old; during a burst every request of the burst would see the
same numbers and herd onto one endpoint. These counts change the moment a request is routed, so
the burst's second request already sees the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import numpy as np

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    Scores,
    register,
)

_requests = attrgetter("in_flight_requests")
_tokens = attrgetter("in_flight_tokens")


@register(SCORERS, "in-flight-load")
class InFlightLoadScorer(Scorer):
    def __init__(self, *, token_share: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        if not 0.0 <= token_share <= 1.0:
            raise ValueError(f"in-flight-load: token_share must be in [0, 1], got {token_share}")
        self.token_share = token_share

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        # The counts read and their ranges taken in C (counts are below 2**53: exact as floats).
        n = len(endpoints)
        reqs = list(map(_requests, endpoints))
        toks = list(map(_tokens, endpoints))
        req_lo, req_hi = min(reqs), max(reqs)
        tok_lo, tok_hi = min(toks), max(toks)
        w_req, w_tok = 1.0 - self.token_share, self.token_share
        req_span, tok_span = req_hi - req_lo, tok_hi - tok_lo
        if not req_span and not tok_span:
            return np.ones(n)
        req_scale = w_req / req_span if req_span else 0.0
        tok_scale = w_tok / tok_span if tok_span else 0.0
        base = (0.0 if req_span else w_req) + (0.0 if tok_span else w_tok)
        # base + (hi_r - r) * scale_r + (hi_t - t) * scale_t per endpoint, in that order
        out = (req_hi - np.array(reqs, np.float64)) * req_scale
        out = base + out
        out += (tok_hi - np.array(toks, np.float64)) * tok_scale
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "token_share": self.token_share}
