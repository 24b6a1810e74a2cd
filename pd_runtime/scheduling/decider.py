"""Decide, once the decode endpoint is chosen, whether a separate prefill pays.

Disaggregation costs a prefill round trip and a KV transfer; it pays when the decode endpoint
would otherwise spend long computing the prompt, stalling the requests it is decoding. What it
would compute is the prompt's tokens it does not already hold, so: disaggregate when
``uncached tokens >= threshold_tokens``. A prompt that could not be tokenized is treated as fully
uncached (its length is unknown; disaggregating is the behaviour of a P/D deployment without
this decider). Without any prefill endpoint, nothing is disaggregated.

``mode="predicted"`` decides by the learned latency model instead
(:mod:`pd_runtime.scheduling.latency`)::

    direct = TTFT_d(u_d + Q_d)                          the decode endpoint prefills itself
    pd     = TTFT_p(u_p + Q_p) + t_d * u_d + H          the fastest warm prefill endpoint p
    disaggregate  iff  pd * (1 + margin) < direct       reason predicted-pd-faster
    else                                                reason predicted-direct-faster

So a machine where the transfer and the extra hop cost more than the decode endpoint's own
prefill stops disaggregating by itself, and long prompts on a busy decode endpoint still go to a
prefill worker. ``p`` is an estimate: the prefill profile, run afterwards, may pick another
prefill endpoint.

Cold start. Each side is learnt only by taking it: the decode endpoint's own prefill line only
from requests served directly, a prefill endpoint's line only from disaggregated ones. Following
the threshold rule while cold would therefore never warm the side it does not take (with every
prompt above the threshold, the decode endpoint would never be timed and the decider would stay
cold for good: the scenario benchmark showed it). So while a side is cold, a request the threshold
would send the other way goes to the cold side instead: ``cold-explore-direct`` (the decode
endpoint has fewer than ``min_samples`` direct TTFTs) or ``cold-explore-pd`` (no healthy prefill
endpoint is warm; only for a prompt with uncached tokens). Otherwise, while cold, the threshold
decides: ``cold-threshold``. Exploring costs at most ``min_samples`` requests per endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pd_runtime.scheduling.plugins import EndpointState, RequestContext

__all__ = ["Decision", "PDDecider"]


@dataclass(frozen=True)
class Decision:
    disaggregate: bool
    reason: str
    uncached_tokens: int | None


@dataclass(frozen=True)
class PDDecider:
    threshold_tokens: int = 256
    mode: str = "threshold"  # or "predicted"
    margin: float = 0.2

    def decide(
        self,
        ctx: RequestContext,
        decode: EndpointState,
        has_prefill: bool,
        prefills: Sequence[EndpointState] = (),
    ) -> Decision:
        """``prefills``: the prefill endpoints the predicted mode may weigh (healthy ones)."""
        if not has_prefill:
            return Decision(False, "no-prefill-endpoint", None)
        if ctx.token_ids is None:
            return Decision(True, "prompt-not-tokenized", None)
        uncached = ctx.uncached_tokens(decode.address)
        if self.mode == "predicted" and ctx.latency is not None:
            model = ctx.latency
            decode_warm = model.warm(decode.address)
            warm = [p for p in prefills if p.healthy and model.warm(p.address)]
            if decode_warm and warm:
                pd = min(
                    model.pd_ttft(p.address, decode.address, ctx.prefill_work(p), uncached)
                    for p in warm
                )
                direct = model.ttft(decode.address, ctx.prefill_work(decode))
                if pd * (1.0 + self.margin) < direct:
                    return Decision(True, "predicted-pd-faster", uncached)
                return Decision(False, "predicted-direct-faster", uncached)
            above = uncached >= self.threshold_tokens
            if above and not decode_warm:
                return Decision(False, "cold-explore-direct", uncached)
            if not above and uncached > 0 and not warm and any(p.healthy for p in prefills):
                return Decision(True, "cold-explore-pd", uncached)
            return Decision(above, "cold-threshold", uncached)
        if uncached >= self.threshold_tokens:
            return Decision(True, "uncached-above-threshold", uncached)
        return Decision(False, "uncached-below-threshold", uncached)
