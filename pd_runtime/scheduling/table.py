"""The candidates of a profile as columns: the vectorized path of filters, scorers and pickers.

A decision at 64 endpoints used to call every scorer and filter once per profile, each a Python
pass over the endpoints building its own address-keyed dict (~200 µs at 64). An
:class:`EndpointTable` holds the load signals the built-in plugins read as numpy columns, one row
per candidate, so a plugin's ``score_all`` / ``filter_all`` / ``pick_index`` is a handful of array
operations whatever the number of endpoints.

The table belongs to one candidate list (the same :class:`EndpointState` objects in the same
order); :meth:`EndpointTable.refresh` re-reads the states once per decision, as one C-level
``attrgetter`` pass, and rewrites only the rows whose values changed (usually the one or two
endpoints the last decision or release booked). A value the columns cannot carry exactly (NaN, a
non-number) makes ``refresh`` return False and the profile uses the plugins' per-endpoint
``score`` path for that decision: the two paths give the same scores bit for bit (IEEE float64
in the same order of operations), the same picks and the same draws from ``ctx.rng``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from operator import attrgetter, ne
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from pd_runtime.scheduling.plugins import EndpointState, RequestContext

__all__ = ["EndpointTable", "FloatArray", "min_max_inverse_array"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_A = TypeVar("_A", bound="np.ndarray[Any, Any]")
_ROW = attrgetter("in_flight_requests", "in_flight_tokens", "waiting", "kv_usage", "healthy")


def min_max_inverse_array(values: FloatArray) -> FloatArray:
    """:func:`~pd_runtime.scheduling.plugins.min_max_inverse` over a column."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.ones(len(values))
    span = high - low
    out: FloatArray = (high - values) / span
    return out


class EndpointTable:
    """Columns of a fixed list of endpoint states (see the module docstring).

    ``waiting`` and ``kv_usage`` hold 0.0 for None (every built-in reads them as ``x or 0``).
    """

    __slots__ = (
        "_cached_for",
        "_cached_held",
        "_memos",
        "_nan_rows",
        "_rows",
        "addresses",
        "healthy",
        "in_flight_requests",
        "in_flight_tokens",
        "index",
        "kv_usage",
        "load",
        "n",
        "parent_rows",
        "signals_version",
        "states",
        "waiting",
    )

    def __init__(self, states: Sequence[EndpointState]) -> None:
        self.states: tuple[EndpointState, ...] = tuple(states)
        self.n = n = len(self.states)
        self.addresses: list[str] = [s.address for s in self.states]
        self.index: dict[str, int] = {a: i for i, a in enumerate(self.addresses)}
        #: in-flight requests (row 0) and tokens (row 1): one reduction gives both minima.
        self.load: npt.NDArray[np.int64] = np.zeros((2, n), np.int64)
        self.in_flight_requests: IntArray = self.load[0]
        self.in_flight_tokens: IntArray = self.load[1]
        #: Bumped whenever a row's waiting / kv_usage / healthy changes (scrapes): plugins that
        #: read only those may reuse their last column while it stays the same.
        self.signals_version = 0
        self.waiting: FloatArray = np.zeros(n)
        self.kv_usage: FloatArray = np.zeros(n)
        self.healthy: BoolArray = np.ones(n, np.bool_)
        self._rows: list[Any] = [None] * n
        self._nan_rows: set[int] = set()
        self._memos: dict[tuple[int, int], Any] = {}
        self._cached_for: RequestContext | None = None
        self._cached_held: FloatArray | None = None
        #: Row numbers in the table this one was cut from (None: not a subset).
        self.parent_rows: IntArray | None = None

    @property
    def usable(self) -> bool:
        """Distinct addresses (the per-endpoint path keys everything by address)."""
        return len(self.index) == self.n

    def refresh(self) -> bool:
        """Re-read the states; False when a value cannot be carried exactly (use ``score``)."""
        self._cached_for = None
        rows = list(map(_ROW, self.states))
        old = self._rows
        if rows != old:
            try:
                for i in compress(range(self.n), map(ne, rows, old)):
                    req, tok, waiting, kv, healthy = rows[i]
                    if type(req) is not int or type(tok) is not int:
                        raise TypeError("in-flight counts must be ints")
                    self.in_flight_requests[i] = req
                    self.in_flight_tokens[i] = tok
                    w = float(waiting or 0.0)
                    k = float(kv or 0.0)
                    h = bool(healthy)
                    if old[i] is None or old[i][2:] != rows[i][2:]:
                        self.signals_version += 1
                    self.waiting[i] = w
                    self.kv_usage[i] = k
                    self.healthy[i] = h
                    if math.isnan(w) or math.isnan(k):
                        self._nan_rows.add(i)
                    else:
                        self._nan_rows.discard(i)
            except (TypeError, ValueError, OverflowError):
                self._rows = [None] * self.n
                return False
            self._rows = rows
        return not self._nan_rows

    def subset(self, keep: BoolArray) -> EndpointTable:
        """A table of the rows where ``keep`` is True (the survivors of the filters)."""
        rows = np.flatnonzero(keep)
        sub = EndpointTable.__new__(EndpointTable)
        states = self.states
        sub.states = tuple([states[i] for i in rows.tolist()])
        sub.n = len(sub.states)
        sub.addresses = [s.address for s in sub.states]
        sub.index = {a: i for i, a in enumerate(sub.addresses)}
        sub.load = self.load[:, rows]
        sub.in_flight_requests = sub.load[0]
        sub.in_flight_tokens = sub.load[1]
        sub.signals_version = -1  # a new table each time: nothing to reuse
        sub.waiting = self.waiting[rows]
        sub.kv_usage = self.kv_usage[rows]
        sub.healthy = self.healthy[rows]
        sub._rows = []
        sub._nan_rows = set()
        sub._memos = {}
        sub._cached_for = None
        sub._cached_held = None
        sub.parent_rows = rows
        if self._cached_for is not None and self._cached_held is not None:
            sub._cached_for = self._cached_for
            sub._cached_held = self._cached_held[rows]
        return sub

    def memo(self, owner: object, compute: Callable[[], _A]) -> _A:
        """``compute()``, reused while no row's scraped signals changed (read-only result)."""
        if self.signals_version < 0:
            return compute()
        key = (id(owner), self.signals_version)
        memos = self._memos
        out = memos.get(key)
        if out is None:
            out = compute()
            out.flags.writeable = False
            if len(memos) > 16:
                memos.clear()
            memos[key] = out
        return out

    def cached_blocks(self, ctx: RequestContext) -> FloatArray:
        """``ctx.cached_blocks`` per row (0 where not held), computed once per request."""
        if self._cached_for is not ctx or self._cached_held is None:
            self._cached_held = np.fromiter(
                map(ctx.cached_blocks.get, self.addresses, repeat(0)), np.float64, self.n
            )
            self._cached_for = ctx
        return self._cached_held
