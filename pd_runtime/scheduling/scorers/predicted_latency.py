"""Predicted-latency scorer: the endpoint expected to finish the answer soonest scores 1, the
others ``fastest / theirs`` (twice as slow: 0.5), from the learned latency model
(:mod:`pd_runtime.scheduling.latency`), per endpoint::

    completion = TTFT(u + Q) + (max_new_tokens - 1) * TPOT(n + 1)

    TTFT = c + a * (uncached prompt tokens + prefill tokens queued there)
    TPOT = b + k * (our requests in flight there, this one included)

This is the one signal the counting scorers lack: speed. Two endpoints with the same queue and
cache score the same there, while one of them is on an older GPU or shares its cores.

Why the whole answer and not only the first token (``objective: ttft``): where a slow endpoint
decodes several times slower, its TTFT for a short prompt can still be as good as the fast
one's, and a TTFT-only score then keeps sending it work that takes seconds to stream. In a
closed loop (clients waiting for their answers) or at a fleet's capacity, the seconds an answer
occupies its endpoint are what goodput is made of. The TPOT part counts only when every warm
candidate's TPOT line is warm too (else they are compared on TTFT alone), so an endpoint whose
TPOT is not known yet never looks faster than one whose TPOT is.

Unanswered requests count before answers can. A request routed to an endpoint for its prefill
that has waited ``w`` seconds for its first token bounds what a new request there will wait
(it queues behind it), so each endpoint's predicted TTFT is at least the wait of its oldest such
request. A stalled or suddenly slow endpoint thus loses its traffic within one request, not
after the dozens of answers its line needs to follow a change; that is also how a cold endpoint
gets judged: a cold one scores ``min(1, fastest warm / its wait)``, never above neutral.

Cold start: an endpoint with fewer than the model's ``min_samples`` TTFT observations scores 1
(neutral, never punished for being unknown: it gets traffic and so samples) unless its wait
says otherwise, and while no candidate is warm, every one scores 1, so the other scorers decide
alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pd_runtime.scheduling.plugins import SCORERS, EndpointState, RequestContext, Scorer, register

Objective = Literal["completion", "ttft"]


@register(SCORERS, "predicted-latency")
class PredictedLatencyScorer(Scorer):
    def __init__(self, *, objective: Objective = "completion", **params: Any) -> None:
        super().__init__(**params)
        if objective not in ("completion", "ttft"):
            raise ValueError(
                f"predicted-latency: objective must be 'completion' or 'ttft', not {objective!r}"
            )
        self.objective = objective

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "objective": self.objective}

    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        model = ctx.latency
        if model is None:
            return {e.address: 1.0 for e in endpoints}
        streamed = ctx.max_new_tokens - 1 if self.objective == "completion" else 0
        now = time.monotonic()
        warm: list[EndpointState] = []
        cold: list[EndpointState] = []
        for e in endpoints:
            (warm if model.warm(e.address) else cold).append(e)
        predicted = {
            e.address: model.ttft_bound(e.address, ctx.prefill_work(e), e.first_token_wait(now))
            for e in warm
        }
        if streamed > 0 and all(model.warm_tpot(e.address) for e in warm):
            for e in warm:
                predicted[e.address] += streamed * model.tpot(e.address, e.in_flight_requests + 1)
        scores = dict.fromkeys((e.address for e in cold), 1.0)
        if predicted:
            fastest = min(predicted.values())
            for address, t in predicted.items():
                scores[address] = fastest / t if t > 0 else 1.0
            for e in cold:
                wait = e.first_token_wait(now)
                if wait > fastest:
                    scores[e.address] = fastest / wait
        return scores
