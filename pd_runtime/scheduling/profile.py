"""A scheduling profile: filters, weighted scorers and a picker, built from YAML.

YAML shape (under ``coordinator.scheduler.params.profiles``)::

    decode:
      filters: [{type: healthy}, {type: not-saturated, max_in_flight: 8}]
      scorers: [{type: prefix-cache, weight: 3}, {type: in-flight-load, weight: 1}]
      picker: {type: max-score}

Any key of a plugin entry other than ``type`` (and ``weight`` for scorers) is passed to the
plugin's constructor, so a typo is an error at start-up, not a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pd_runtime.errors import ConfigError, NoEndpointError
from pd_runtime.scheduling.plugins import (
    FILTERS,
    PICKERS,
    SCORERS,
    EndpointState,
    Filter,
    Picker,
    RequestContext,
    Scorer,
    Scores,
    addresses,
    load_builtin_plugins,
)

__all__ = ["PluginSpec", "ProfileConfig", "ProfileResult", "SchedulingProfile"]


class PluginSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    weight: float = Field(default=1.0, ge=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filters: list[PluginSpec] = Field(default_factory=list)
    scorers: list[PluginSpec] = Field(default_factory=list)
    picker: PluginSpec = PluginSpec(type="max-score")


class ProfileResult:
    """One run's outcome. The scores are kept as arrays over the survivors (``addresses``'
    order); ``totals`` and ``scores`` are their dict views, built on first use (the decision
    line's breakdown reads the arrays directly, for its top-k endpoints only)."""

    def __init__(
        self,
        picked: EndpointState,
        addresses: list[str],
        total: Scores,
        arrays: dict[str, Scores],
        filtered_out: tuple[str, ...],
    ) -> None:
        self.picked = picked
        self.addresses = addresses  # the survivors of the filters, in candidate order
        self.total = total
        self.arrays = arrays  # scorer name -> its scores, aligned with addresses
        self.filtered_out = filtered_out

    @cached_property
    def totals(self) -> dict[str, float]:
        """Endpoint address -> weighted total in [0, 1]."""
        return dict(zip(self.addresses, self.total.tolist(), strict=True))

    @cached_property
    def scores(self) -> dict[str, dict[str, float]]:
        """Scorer name -> endpoint address -> score."""
        return {
            name: dict(zip(self.addresses, values.tolist(), strict=True))
            for name, values in self.arrays.items()
        }


def _build(registry: Any, spec: PluginSpec, where: str) -> Any:
    try:
        return registry.create(spec.type, **spec.params)
    except (KeyError, TypeError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"{where}: {message}") from None


class SchedulingProfile:
    def __init__(self, role: str, config: ProfileConfig) -> None:
        load_builtin_plugins()
        self.role = role
        where = f"scheduler.params.profiles.{role}"
        self.filters: list[Filter] = [
            _build(FILTERS, s, f"{where}.filters") for s in config.filters
        ]
        self.scorers: list[tuple[Scorer, float]] = [
            (_build(SCORERS, s, f"{where}.scorers"), s.weight) for s in config.scorers
        ]
        self.picker: Picker = _build(PICKERS, config.picker, f"{where}.picker")
        total_weight = sum(w for _, w in self.scorers) or 1.0
        # Normalised once here, so totals land in [0, 1] without a pass per decision.
        self._weighted = [(s, w / total_weight) for s, w in self.scorers]

    def run(self, ctx: RequestContext, candidates: Sequence[EndpointState]) -> ProfileResult:
        survivors = list(candidates)
        for f in self.filters:
            kept = f.filter(ctx, survivors)
            if kept or not f.fail_open:
                survivors = kept
            if not survivors:
                raise NoEndpointError(f"no {self.role} endpoint can take the request ({f.name})")
        if not survivors:
            raise NoEndpointError(f"no {self.role} endpoint is configured")
        # Every scorer scores all survivors at once (an array in their order); the weighted
        # sum is accumulated in the scorers' order, so each total is the same float as a sum
        # per endpoint would give.
        total = np.zeros(len(survivors))
        arrays: dict[str, Scores] = {}
        for scorer, weight in self._weighted:
            values = scorer.score_array(ctx, survivors)
            arrays[scorer.name] = values
            total += weight * values
        picked = self.picker.pick_array(ctx, survivors, total)
        for scorer, _ in self.scorers:
            scorer.picked(ctx, picked)
        addrs = addresses(survivors)
        gone: tuple[str, ...] = ()
        if len(survivors) != len(candidates):
            gone = tuple(sorted({e.address for e in candidates}.difference(addrs)))
        return ProfileResult(picked, addrs, total, arrays, gone)

    def describe(self) -> dict[str, Any]:
        return {
            "filters": [f.describe() for f in self.filters],
            "scorers": [{**s.describe(), "weight": w} for s, w in self.scorers],
            "picker": self.picker.describe(),
        }
