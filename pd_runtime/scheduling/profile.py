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

import heapq
from collections.abc import Sequence
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
    load_builtin_plugins,
)
from pd_runtime.scheduling.table import BoolArray, EndpointTable, FloatArray

__all__ = ["VECTORIZE_FROM", "PluginSpec", "ProfileConfig", "ProfileResult", "SchedulingProfile"]

#: Candidates from which a vectorized profile runs on arrays: below it, a Python pass over the
#: few endpoints is cheaper than numpy's per-call overhead (both give the same result).
VECTORIZE_FROM = 12


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
    """What a profile run chose. ``totals`` (endpoint -> weighted total) and ``scores`` (scorer
    name -> endpoint -> score) are built on first access when the run was vectorized (the
    decision line needs only the best few: :meth:`top` and :meth:`scores_for`)."""

    __slots__ = (
        "_addresses",
        "_arrays",
        "_index",
        "_scores",
        "_totals",
        "_totals_array",
        "filtered_out",
        "picked",
    )

    def __init__(
        self,
        picked: EndpointState,
        totals: dict[str, float],
        scores: dict[str, dict[str, float]],
        filtered_out: tuple[str, ...],
    ) -> None:
        self.picked = picked
        self.filtered_out = filtered_out
        self._totals: dict[str, float] | None = totals
        self._scores: dict[str, dict[str, float]] | None = scores
        self._addresses: list[str] = []
        self._index: dict[str, int] = {}
        self._totals_array: FloatArray | None = None
        self._arrays: dict[str, FloatArray] = {}

    @classmethod
    def from_arrays(
        cls,
        picked: EndpointState,
        table: EndpointTable,
        totals: FloatArray,
        arrays: dict[str, FloatArray],
        filtered_out: tuple[str, ...],
    ) -> ProfileResult:
        result = cls.__new__(cls)
        result.picked = picked
        result.filtered_out = filtered_out
        result._totals = None
        result._scores = None
        result._addresses = table.addresses
        result._index = table.index
        result._totals_array = totals
        result._arrays = arrays
        return result

    @property
    def size(self) -> int:
        """Endpoints scored (the survivors of the filters)."""
        return len(self._addresses) if self._totals_array is not None else len(self.totals)

    @property
    def totals(self) -> dict[str, float]:
        if self._totals is None:
            assert self._totals_array is not None
            self._totals = dict(zip(self._addresses, self._totals_array.tolist(), strict=True))
        return self._totals

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        if self._scores is None:
            addresses = self._addresses
            self._scores = {
                name: dict(zip(addresses, values.tolist(), strict=True))
                for name, values in self._arrays.items()
            }
        return self._scores

    def top(self, k: int) -> dict[str, dict[str, float]]:
        """``scores`` and ``total`` (last) of the ``k`` endpoints with the best totals and the
        one picked: best first, ties in candidate order (``heapq.nlargest``'s), then the picked
        one if it is not among them (ties broken at random may leave it out)."""
        picked = self.picked.address
        if self._totals_array is None:
            totals = self.totals
            keep = heapq.nlargest(k, totals, key=totals.__getitem__)
            if picked not in keep:
                keep.append(picked)
            out = {
                name: {a: values[a] for a in keep if a in values}
                for name, values in self.scores.items()
            }
            out["total"] = {a: totals[a] for a in keep}
            return out
        order: list[int] = np.argsort(-self._totals_array, kind="stable")[:k].tolist()
        row = self._index[picked]
        if row not in order:
            order.append(row)
        rows = np.array(order)
        all_addresses = self._addresses
        addresses = [all_addresses[i] for i in order]
        out = {
            name: dict(zip(addresses, values.take(rows).tolist(), strict=True))
            for name, values in self._arrays.items()
        }
        out["total"] = dict(zip(addresses, self._totals_array.take(rows).tolist(), strict=True))
        return out


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
        #: Every plugin has a vectorized method: run on an EndpointTable (see table.py).
        self.vectorized = (
            all(_overrides(f, Filter, "filter", "filter_all") for f in self.filters)
            and all(_overrides(s, Scorer, "score", "score_all") for s, _ in self.scorers)
            and _overrides(self.picker, Picker, "pick", "pick_index")
        )
        self._tables: dict[tuple[EndpointState, ...], EndpointTable] = {}

    def run(self, ctx: RequestContext, candidates: Sequence[EndpointState]) -> ProfileResult:
        if self.vectorized and len(candidates) >= VECTORIZE_FROM:
            table = self._table(candidates)
            if table.refresh():
                result = self._run_table(ctx, table)
                if result is not None:
                    return result
        return self.run_reference(ctx, candidates)

    def _table(self, candidates: Sequence[EndpointState]) -> EndpointTable:
        key = tuple(candidates)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 4:  # the usual set, plus failover subsets now and then
                self._tables.clear()
            table = self._tables[key] = EndpointTable(key)
        return table

    def _run_table(self, ctx: RequestContext, table: EndpointTable) -> ProfileResult | None:
        """``run_reference`` over columns; None: a plugin declined this request."""
        if not table.usable:
            return None
        masks = []
        for f in self.filters:
            mask = f.filter_all(ctx, table)
            if mask is None:
                return None
            masks.append(mask)
        keep = None
        if len(masks) == 1:
            keep = masks[0]
        elif masks:
            keep = np.logical_and.reduce(masks)
        if keep is None or keep.all():  # the usual case: every candidate passes every filter
            return self._score_table(ctx, table, None, ())
        keep = None
        for f, mask in zip(self.filters, masks, strict=True):
            kept = mask if keep is None else keep & mask
            if not f.fail_open or kept.any():
                keep = kept
                if not keep.any():
                    raise NoEndpointError(
                        f"no {self.role} endpoint can take the request ({f.name})"
                    )
        gone: tuple[str, ...] = ()
        if keep is not None and not keep.all():
            addresses = table.addresses
            gone = tuple(sorted([addresses[i] for i in np.flatnonzero(~keep).tolist()]))
            return self._score_table(ctx, table, keep, gone)
        return self._score_table(ctx, table, None, gone)

    def _score_table(
        self,
        ctx: RequestContext,
        table: EndpointTable,
        keep: BoolArray | None,
        gone: tuple[str, ...],
    ) -> ProfileResult | None:
        survivors = table if keep is None else table.subset(keep)
        totals = np.zeros(survivors.n)
        arrays: dict[str, FloatArray] = {}
        for scorer, weight in self._weighted:
            values = scorer.score_all(ctx, survivors)
            if values is None:
                return None
            arrays[scorer.name] = values
            totals += weight * values
        row = self.picker.pick_index(ctx, survivors, totals)
        if row is None:
            return None
        picked = survivors.states[row]
        for scorer, _ in self.scorers:
            scorer.picked(ctx, picked)
        return ProfileResult.from_arrays(picked, survivors, totals, arrays, gone)

    def run_reference(
        self, ctx: RequestContext, candidates: Sequence[EndpointState]
    ) -> ProfileResult:
        """The per-endpoint path: every plugin's ``filter`` / ``score`` / ``pick``."""
        survivors = list(candidates)
        for f in self.filters:
            kept = f.filter(ctx, survivors)
            if kept or not f.fail_open:
                survivors = kept
            if not survivors:
                raise NoEndpointError(f"no {self.role} endpoint can take the request ({f.name})")
        if not survivors:
            raise NoEndpointError(f"no {self.role} endpoint is configured")
        totals = dict.fromkeys([e.address for e in survivors], 0.0)
        scores: dict[str, dict[str, float]] = {}
        for scorer, weight in self._weighted:
            s = scorer.score(ctx, survivors)
            scores[scorer.name] = s
            for address, value in s.items():
                totals[address] += weight * value
        picked = self.picker.pick(ctx, survivors, totals)
        for scorer, _ in self.scorers:
            scorer.picked(ctx, picked)
        gone: tuple[str, ...] = ()
        if len(survivors) != len(candidates):
            gone = tuple(sorted({e.address for e in candidates} - totals.keys()))
        return ProfileResult(picked, totals, scores, gone)

    def describe(self) -> dict[str, Any]:
        return {
            "vectorized": self.vectorized,
            "filters": [f.describe() for f in self.filters],
            "scorers": [{**s.describe(), "weight": w} for s, w in self.scorers],
            "picker": self.picker.describe(),
        }


def _overrides(plugin: Any, base: type, per_endpoint: str, vectorized: str) -> bool:
    """``plugin``'s class defines ``vectorized`` no higher in its MRO than ``per_endpoint`` (a
    subclass that changes ``score`` but inherits its parent's ``score_all`` is not vectorized)."""
    mro = type(plugin).__mro__

    def definer(name: str) -> int:
        return next(i for i, c in enumerate(mro) if name in c.__dict__)

    return definer(vectorized) < mro.index(base) and definer(vectorized) <= definer(per_endpoint)
