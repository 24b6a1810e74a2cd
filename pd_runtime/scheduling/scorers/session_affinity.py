"""Session-affinity scorer: requests carrying the same session header go where the session last
went (1.0 there, 0 elsewhere; no header or a new session: 0 everywhere).

Multi-turn chat usually hits the prefix scorer anyway; this keeps a session together when the
prompt cannot be tokenized, or when a client wants stickiness beyond what the cache shows.
Sessions are remembered in LRU order, at most ``max_sessions``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    Scores,
    addresses,
    register,
)


@register(SCORERS, "session-affinity")
class SessionAffinityScorer(Scorer):
    def __init__(self, *, max_sessions: int = 100_000, **params: Any) -> None:
        super().__init__(**params)
        self.max_sessions = max_sessions
        self._where: OrderedDict[str, str] = OrderedDict()

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        scores = np.zeros(len(endpoints))
        last = self._where.get(ctx.session) if ctx.session else None
        if last is not None:
            addrs = addresses(endpoints)
            if last in addrs:
                scores[addrs.index(last)] = 1.0
        return scores

    def picked(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if not ctx.session:
            return
        self._where[ctx.session] = endpoint.address
        self._where.move_to_end(ctx.session)
        while len(self._where) > self.max_sessions:
            self._where.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "max_sessions": self.max_sessions, "sessions": len(self._where)}
