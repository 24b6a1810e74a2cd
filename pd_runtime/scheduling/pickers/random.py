"""Pick uniformly at random among the candidates that survived the filters (ignores scores).
A baseline, and a way to turn a profile's scoring off without removing its filters."""

from __future__ import annotations

from collections.abc import Sequence

from pd_runtime.scheduling.plugins import (
    PICKERS,
    EndpointState,
    Picker,
    RequestContext,
    Scores,
    register,
)


@register(PICKERS, "random")
class RandomPicker(Picker):
    def pick(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: dict[str, float]
    ) -> EndpointState:
        return ctx.rng.choice(list(endpoints))

    def pick_array(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: Scores
    ) -> EndpointState:
        return ctx.rng.choice(list(endpoints))
