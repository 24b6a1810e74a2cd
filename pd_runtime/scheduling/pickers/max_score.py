"""Pick the highest total score; break ties (within ``tolerance``) at random or by the prompt.

A deterministic "first in the list" tie-break sends every request of a burst that sees equal
scores to the same endpoint; a random one spreads them. ``tie_break: prefix`` ranks the tied
endpoints by a stable hash of the prompt's first block and each endpoint (rendezvous hashing):
spread like random across prompts, but the same prompt start always lands on the same endpoint
among equals, in every process. That is what lets coordinator replicas, which do not see each
other's in-flight claims (pending overlay), agree where a new prefix goes instead of each giving
it a home of its own. Prompts without block keys (no tokenizer) fall back to random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import compress, repeat
from operator import ge
from typing import Any, Literal

import numpy as np

from pd_runtime.scheduling.plugins import (
    PICKERS,
    EndpointState,
    Picker,
    RequestContext,
    Scores,
    addresses,
    register,
)

__all__ = ["MaxScorePicker", "rendezvous_rank"]


def rendezvous_rank(key: int, address: str) -> bytes:
    """A per-(prompt start, endpoint) rank that every process computes alike (not ``hash()``,
    which Python salts per process for strings)."""
    return hashlib.blake2b(f"{key}@{address}".encode(), digest_size=8).digest()


@register(PICKERS, "max-score")
class MaxScorePicker(Picker):
    def __init__(
        self,
        *,
        tolerance: float = 1e-9,
        tie_break: Literal["random", "prefix"] = "random",
        **params: Any,
    ) -> None:
        super().__init__(**params)
        if tie_break not in ("random", "prefix"):
            raise ValueError(f"max-score: tie_break must be random or prefix, not {tie_break!r}")
        self.tolerance = tolerance
        self.tie_break = tie_break

    def pick(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: dict[str, float]
    ) -> EndpointState:
        values = list(map(totals.__getitem__, addresses(endpoints)))
        best = max(values)
        top = list(compress(endpoints, map(ge, values, repeat(best - self.tolerance))))
        return self._among(ctx, top)

    def pick_array(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: Scores
    ) -> EndpointState:
        best = float(totals.max())
        top = np.flatnonzero(totals >= best - self.tolerance).tolist()
        return self._among(ctx, [endpoints[i] for i in top])

    def _among(self, ctx: RequestContext, top: list[EndpointState]) -> EndpointState:
        """The tie-break among the candidates within ``tolerance`` of the best (in order)."""
        if len(top) == 1:
            return top[0]
        if self.tie_break == "prefix" and ctx.block_keys:
            first = ctx.block_keys[0]
            return max(top, key=lambda e: rendezvous_rank(first, e.address))
        return ctx.rng.choice(top)

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "tie_break": self.tie_break}
