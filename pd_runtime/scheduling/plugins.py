"""The seams of the KV-aware scheduler: filters, scorers and pickers, and what they see.

A scheduling profile (one per role: decode, prefill) runs::

    candidates --filters--> survivors --scorers (weighted sum)--> totals --picker--> endpoint

Every plugin is a small class registered by name with a decorator in a module of its own under
``scheduling/filters``, ``scheduling/scorers`` or ``scheduling/pickers``; those packages are
imported on first use, so a new scorer is one file and YAML names it by its registered name.
Plugins must be fast (a decision at 64 endpoints has a budget of ~100 µs) and must not block:
everything they read is already in :class:`EndpointState` and :class:`RequestContext`. At that
budget a Python expression per endpoint per plugin is most of it, so the profile works on arrays
over all candidates at once: it calls :meth:`Scorer.score_array` (one float64 array, the
candidates' order) and :meth:`Picker.pick_array`, and sums the weighted arrays with numpy. The
built-in plugins implement those; a plugin that implements only the dict methods (``score`` /
``pick``) still works through the base class's conversion (one dict per call, the slower path).
The built-ins read attributes with ``map(attrgetter(...))`` into ``np.fromiter`` (the loops run
in C), and the scrape-only scorers memoize their last answer (:class:`Memo`).
"""

from __future__ import annotations

import importlib
import pkgutil
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, sub, truediv
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from pd_runtime.common.registry import Registry
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.latency import LatencyModel

__all__ = [
    "FILTERS",
    "PICKERS",
    "SCORERS",
    "EndpointState",
    "Filter",
    "Memo",
    "Picker",
    "RequestContext",
    "Scorer",
    "Scores",
    "addresses",
    "load_builtin_plugins",
    "min_max_inverse",
    "min_max_inverse_array",
    "register",
]


@dataclass(eq=False)
class EndpointState:
    """What the scheduler knows about one endpoint right now.

    ``in_flight_*`` are the coordinator's own counts (fresh even under bursts); ``waiting``,
    ``running`` and ``kv_usage`` come from the worker's ``/metrics`` (a scrape interval old, None
    until the first scrape). ``healthy`` turns False after consecutive failed scrapes.
    ``pending_prefill_tokens`` is the coordinator's own count too: uncached prompt tokens of
    requests routed here for their prefill whose first token has not come back yet (the prefill
    work queued ahead, :mod:`pd_runtime.scheduling.latency`). ``nixl_xfer_seconds_sum`` /
    ``nixl_xfer_count`` are the worker's cumulative ``vllm:nixl_xfer_time_seconds_sum`` /
    ``_count`` when whatever fills this state reads them (None: not read; the latency model then
    uses ``transfer_s_per_token``). ``awaiting_first_token`` maps each of those queued requests that
    stream (where a latency-learning scheduler is told of their first chunk) to when it was sent
    (monotonic seconds), oldest first: a request unanswered for long is evidence of a slow or
    stalled endpoint before any answer can teach the latency model.
    """

    config: EndpointConfig
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    pending_prefill_tokens: int = 0
    awaiting_first_token: dict[int, float] = field(default_factory=dict)
    nixl_xfer_seconds_sum: float | None = None
    nixl_xfer_count: float | None = None
    scraped_at: float | None = None
    scrape_failures: int = 0
    healthy: bool = True
    # Copies of the config's, as plain attributes: scorers read them per endpoint per decision.
    address: str = field(init=False)
    role: str = field(init=False)

    def __post_init__(self) -> None:
        self.address = self.config.address
        self.role = self.config.role

    def first_token_wait(self, now: float) -> float:
        """Seconds the oldest request prefilling here has waited for its first token (0: none)."""
        for sent in self.awaiting_first_token.values():
            return max(0.0, now - sent)
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "role": self.role,
            "address": self.address,
            "url": self.config.url,
            "healthy": self.healthy,
            "in_flight_requests": self.in_flight_requests,
            "in_flight_tokens": self.in_flight_tokens,
            "waiting": self.waiting,
            "running": self.running,
            "kv_usage": self.kv_usage,
            "pending_prefill_tokens": self.pending_prefill_tokens,
            "first_token_wait_s": round(self.first_token_wait(time.monotonic()), 3),
            "scraped_at": self.scraped_at,
            "scrape_failures": self.scrape_failures,
        }


@dataclass
class RequestContext:
    """One request as the plugins see it.

    ``token_ids`` is the prompt as the engine will see it (chat template applied), or None when it
    could not be tokenized; ``block_keys`` are its full blocks' keys; ``cached_blocks`` maps each
    endpoint address holding a leading part of the prompt (KV events, or a request routed there
    whose events have not arrived yet) to how many leading blocks it holds. ``latency`` is the
    scheduler's learned latency model (None: the policy has none); a filter that checks SLO
    targets sets ``slo`` to ``"met"`` or ``"unmet"`` for the decision record. ``max_new_tokens``
    is the most tokens the answer may have (the request's ``max_tokens``, else the scheduler's
    default): what a scorer predicting the whole answer's time multiplies the TPOT by.
    """

    request: SchedulingRequest
    token_ids: list[int] | None
    block_size: int
    block_keys: list[int] = field(default_factory=list)
    cached_blocks: dict[str, int] = field(default_factory=dict)
    session: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    latency: LatencyModel | None = None
    slo: str | None = None
    max_new_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else 0

    def cached_tokens(self, address: str) -> int:
        return self.cached_blocks.get(address, 0) * self.block_size

    def uncached_tokens(self, address: str) -> int:
        return max(0, self.prompt_tokens - self.cached_tokens(address))

    def prefill_work(self, endpoint: EndpointState) -> int:
        """``u + Q`` of the latency model: the tokens ``endpoint`` would prefill before this
        request's first token (its uncached part of the prompt and the prefills queued there)."""
        return self.uncached_tokens(endpoint.address) + endpoint.pending_prefill_tokens


class Plugin:
    """Base of every plugin: a registered name and keyword parameters from YAML."""

    name: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(
                f"{self.name or type(self).__name__}: unknown parameters {sorted(params)}"
            )

    def describe(self) -> dict[str, Any]:
        return {"type": self.name}


class Filter(Plugin, ABC):
    """Drops candidates that must not serve the request. Returning an empty list is allowed:
    the profile then fails over to the unfiltered list only if the filter says so
    (``fail_open``), otherwise the request gets a 503."""

    fail_open: ClassVar[bool] = False

    @abstractmethod
    def filter(
        self, ctx: RequestContext, endpoints: list[EndpointState]
    ) -> list[EndpointState]: ...


#: A scorer's scores (or a profile's totals) over the candidates, in their order.
Scores = NDArray[np.float64]


class Scorer(Plugin, ABC):
    """Scores candidates in [0, 1], higher is better; every candidate gets a score.

    Implement one of the two methods; each default is the other one converted. The profile calls
    ``score_array`` (an array aligned with ``endpoints``), so a scorer that implements it costs a
    few C-level passes per decision; one that implements only ``score`` (address -> score) still
    works, at the price of a dict and its conversion. A returned array may be shared between
    calls (memoized): callers must not modify it."""

    def score(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> dict[str, float]:
        values = self.score_array(ctx, endpoints).tolist()
        return dict(zip(addresses(endpoints), values, strict=True))

    def score_array(self, ctx: RequestContext, endpoints: Sequence[EndpointState]) -> Scores:
        scores = self.score(ctx, endpoints)
        # An address the dict lacks adds 0 to its total, as the dict path always did.
        values = map(scores.get, addresses(endpoints), repeat(0.0))
        return np.fromiter(values, np.float64, len(endpoints))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.score is Scorer.score and cls.score_array is Scorer.score_array:
            raise TypeError(f"{cls.__name__}: a scorer implements score or score_array")

    def picked(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        """The profile chose ``endpoint`` for this request (stateful scorers remember it)."""


class Picker(Plugin, ABC):
    """Chooses one of the candidates from their totals. The profile calls ``pick_array`` (totals
    aligned with ``endpoints``); its default converts to the dict of ``pick``."""

    @abstractmethod
    def pick(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: dict[str, float]
    ) -> EndpointState: ...

    def pick_array(
        self, ctx: RequestContext, endpoints: Sequence[EndpointState], totals: Scores
    ) -> EndpointState:
        return self.pick(
            ctx, endpoints, dict(zip(addresses(endpoints), totals.tolist(), strict=True))
        )


FILTERS: Registry[Filter] = Registry("filter")
SCORERS: Registry[Scorer] = Registry("scorer")
PICKERS: Registry[Picker] = Registry("picker")


def register(registry: Registry[Any], name: str) -> Any:
    """Class decorator: register the plugin under ``name`` and give it that name."""

    def wrap(cls: type[Plugin]) -> type[Plugin]:
        cls.name = name
        registry.register(name, cls)
        return cls

    return wrap


_PLUGIN_PACKAGES = ("filters", "scorers", "pickers")
_loaded = False


def load_builtin_plugins() -> None:
    """Import every module of the plugin packages once, so that their decorators register them."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in _PLUGIN_PACKAGES:
        package = importlib.import_module(f"pd_runtime.scheduling.{package_name}")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


def min_max_inverse(values: dict[str, float]) -> dict[str, float]:
    """Lower is better → score in [0, 1]: the lowest gets 1, the highest 0, all equal → 1."""
    if not values:
        return {}
    vals = values.values()
    low, high = min(vals), max(vals)
    if high <= low:
        return dict.fromkeys(values, 1.0)
    # (high - v) / span per value, in C
    scores = map(truediv, map(sub, repeat(high), vals), repeat(high - low))
    return dict(zip(values, scores, strict=True))


def min_max_inverse_array(values: Scores) -> Scores:
    """:func:`min_max_inverse` on an array (the same operations, so the same floats)."""
    if not len(values):
        return values
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.ones(len(values))
    return (high - values) / (high - low)


#: The candidates' addresses, in order (one C-level pass).
_address = attrgetter("address")


def addresses(endpoints: Sequence[EndpointState]) -> list[str]:
    return list(map(_address, endpoints))


class Memo:
    """The last answer of a scorer that reads only scraped signals, reused while the candidates
    and the signal are the same (they change per scrape, not per decision). ``compute`` gets the
    signal's values in the candidates' order; the array it returns is shared (read-only)."""

    __slots__ = ("_compute", "_endpoints", "_get", "_result", "_values")

    def __init__(self, attribute: str, compute: Callable[[list[Any]], Scores]) -> None:
        self._get = attrgetter(attribute)
        self._compute = compute
        self._endpoints: list[EndpointState] | None = None
        self._values: list[Any] | None = None
        self._result: Scores = np.zeros(0)

    def __call__(self, endpoints: Sequence[EndpointState]) -> Scores:
        values = list(map(self._get, endpoints))
        # The same state objects (identity: EndpointState has no __eq__) with the same values.
        if values != self._values or self._endpoints != endpoints:
            result = self._compute(values)
            result.flags.writeable = False
            self._result, self._endpoints, self._values = result, list(endpoints), values
        return self._result
