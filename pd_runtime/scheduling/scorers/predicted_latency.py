"""Predicted-latency scorer: the endpoint expected to return the first token soonest scores 1,
the others ``fastest / theirs`` (twice as slow: 0.5), from the learned latency model
(:mod:`pd_runtime.scheduling.latency`): ``TTFT = c + a * (uncached prompt tokens + prefill tokens
queued there)``, per endpoint.

This is the one signal the counting scorers lack: speed. Two endpoints with the same queue and
cache score the same there, while one of them is on an older GPU or shares its cores. Cold
start: an endpoint with fewer than the model's ``min_samples`` observations scores 1 (neutral,
never punished for being unknown: it gets traffic and so samples), and while no candidate is
warm, every one scores 1, so the other scorers decide alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from pd_runtime.scheduling.plugins import SCORERS, EndpointState, RequestContext, Scorer, register


@register(SCORERS, "predicted-latency")
class PredictedLatencyScorer(Scorer):
    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        model = ctx.latency
        if model is None:
            return {e.address: 1.0 for e in endpoints}
        predicted: dict[str, float] = {}
        scores: dict[str, float] = {}
        for e in endpoints:
            if model.warm(e.address):
                predicted[e.address] = model.ttft(e.address, ctx.prefill_work(e))
            else:
                scores[e.address] = 1.0
        if predicted:
            fastest = min(predicted.values())
            for address, t in predicted.items():
                scores[address] = fastest / t if t > 0 else 1.0
        return scores
