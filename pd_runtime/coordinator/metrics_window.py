"""Recent history of the coordinator's own Prometheus metrics, for the dashboard.

The coordinator keeps cumulative counters and histograms (``metrics.py``); a dashboard wants what
happened lately: decisions per second, request time percentiles over the last minute. Both are
differences between two readings of the same counters, so :class:`MetricsWindow` reads the
registry when the dashboard asks (not per request) and keeps a reading at most every
``min_gap_s`` for ``span_s``::

    readings kept:   r0 ─ r1 ─ r2 ─ ... ─ rk    (>= min_gap_s apart; r0 the newest >= span_s old)
    now:                                 ─ now  (read at every poll, kept when rk is old enough)
    over the span:   now - r1      (~span_s, or less while nobody has watched that long)
    rates:           now - ri      (ri: the oldest reading at most rate_s old)

A window is only as fine as the polls: with nobody watching, nothing is read, and the first poll
after a pause sees a short window (``seconds`` says how long it really is). Quantiles are
estimated from histogram buckets as PromQL's ``histogram_quantile`` does (linear within a bucket).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

from prometheus_client import CollectorRegistry

__all__ = ["MetricsWindow", "Reading", "histogram_quantile"]

#: Sample name → label set (sorted (name, value) pairs) → value.
Samples: TypeAlias = dict[str, dict[tuple[tuple[str, str], ...], float]]


@dataclass(frozen=True)
class Reading:
    """Every sample of the registry at one moment (``at``: monotonic, ``wall``: epoch seconds)."""

    at: float
    wall: float
    samples: Samples

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        """``name``'s label sets (as dicts) and values."""
        for labels, value in self.samples.get(name, {}).items():
            yield dict(labels), value

    def total(self, name: str, **labels: str) -> float:
        """``name`` summed over the label sets that carry ``labels``."""
        return sum(
            value
            for key, value in self.samples.get(name, {}).items()
            if all((k, v) in key for k, v in labels.items())
        )

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """``name`` summed by the values of ``keys`` (like PromQL's ``sum by``)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.series(name):
            group = tuple(labels.get(k, "") for k in keys)
            out[group] = out.get(group, 0.0) + value
        return out

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """``histogram``'s cumulative (upper bound, count) pairs summed over its other labels."""
        out: dict[float, float] = {}
        for labels, value in self.series(f"{histogram}_bucket"):
            le = float(labels["le"])
            out[le] = out.get(le, 0.0) + value
        return sorted(out.items())


def read_registry(registry: CollectorRegistry, at: float, wall: float) -> Reading:
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return Reading(at, wall, samples)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile (0..1) of cumulative ``(upper bound, count)`` buckets sorted by bound,
    interpolated linearly within its bucket (the first bucket starts at 0); in the ``+Inf`` bucket,
    the highest finite bound. None when there are no observations."""
    pairs = list(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank and count > lower_count:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_delta(
    now: list[tuple[float, float]], then: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The observations between two readings of one histogram's buckets."""
    before = dict(then)
    return [(le, count - before.get(le, 0.0)) for le, count in now]


class MetricsWindow:
    """Readings of ``registry`` taken by :meth:`poll`, kept at most every ``min_gap_s`` for
    ``span_s``. Not thread-safe: poll it from the event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        span_s: float = 60.0,
        min_gap_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.span_s = span_s
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._wall = wall_clock
        self.kept: deque[Reading] = deque()

    def poll(self) -> Reading:
        """Read the registry now; keep the reading when the last kept one is ``min_gap_s`` old,
        and forget those older than ``span_s`` (always keeping one to compare with)."""
        now = read_registry(self.registry, self._clock(), self._wall())
        if not self.kept or now.at - self.kept[-1].at >= self.min_gap_s:
            self.kept.append(now)
        while len(self.kept) > 1 and now.at - self.kept[1].at >= self.span_s:
            self.kept.popleft()
        return now

    def since(self, now: Reading, seconds: float) -> Reading:
        """The oldest kept reading at most ``seconds`` before ``now`` (``now`` itself if none)."""
        for reading in self.kept:
            if now.at - reading.at <= seconds:
                return reading
        return now

    def pairs(self) -> Iterator[tuple[Reading, Reading]]:
        """Consecutive kept readings, oldest first."""
        return itertools.pairwise(list(self.kept))
