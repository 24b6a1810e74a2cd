"""Decide, once the decode endpoint is chosen, whether a separate prefill pays.

Disaggregation costs a prefill round trip and a KV transfer; it pays when the decode endpoint
would otherwise spend long computing the prompt, stalling the requests it is decoding. What it
would compute is the prompt's tokens it does not already hold, so: disaggregate when
``uncached tokens >= threshold_tokens``. A prompt that could not be tokenized is treated as fully
uncached (its length is unknown; disaggregating is the behaviour of a P/D deployment without
this decider). Without any prefill endpoint, nothing is disaggregated.
"""

from __future__ import annotations

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

    def decide(self, ctx: RequestContext, decode: EndpointState, has_prefill: bool) -> Decision:
        if not has_prefill:
            return Decision(False, "no-prefill-endpoint", None)
        if ctx.token_ids is None:
            return Decision(True, "prompt-not-tokenized", None)
        uncached = ctx.uncached_tokens(decode.address)
        if uncached >= self.threshold_tokens:
            return Decision(True, "uncached-above-threshold", uncached)
        return Decision(False, "uncached-below-threshold", uncached)
