"""How many ``Got pod scores`` lines the coordinator writes: every decision up to a rate, then one
line per window saying how many were left out.

Why a limit: the decision line is the costliest bookkeeping the coordinator does per request:
building it (the kv-aware breakdown and scores are ~70 µs of the ~95 µs a line costs,
``benchmarks/results/2026-12-07-decisions``), handing it to the logging thread and writing it.
Capped at 100 lines a second, the coordinator's CPU per request at 64 concurrent streams fell by
12-14 % (``benchmarks/results/2026-12-07-decision-lines``, paired by round). At a thousand
requests a second it is also megabytes of log a second that nobody reads line by line. Below the
rate (the default, 100 lines/s, covers a demo, an e2e run, a debugging session) every decision is
logged, as before; above it the first ``per_s`` of each second are, and when the window has passed
one line says how many were not (``pd_coordinator_decision_lines_skipped_total`` counts them
too). The decisions worth reading whatever the rate, a retry after a failed attempt and a request
whose latency target no endpoint was predicted to meet, are not counted against the budget: the
coordinator logs them always (``app.py``).

A fixed window, not a token bucket from a rate-limiting library: this runs once per request on
the event loop, and a clock read, a compare and a decrement is all it needs; the libraries'
per-call cost (storage backends, locks, awaiting a slot) is for limiting work, not log lines.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

__all__ = ["DecisionLineBudget"]


class DecisionLineBudget:
    """``admit()`` says whether this decision's line is written; not thread-safe (the loop's).

    ``per_s`` 0 means no limit. Rates below one line a second widen the window (0.2: one line
    per 5 s) rather than admitting nothing. ``on_skipped`` is called for each line left out (the
    Prometheus counter), the summary line once per window, by the first decision after it ends
    or by :meth:`flush`."""

    __slots__ = ("_clock", "_left", "_logger", "_on_skipped", "_skipped", "_window_end", "per_s")

    def __init__(
        self,
        per_s: float,
        logger: logging.Logger,
        on_skipped: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_s < 0:
            raise ValueError(f"decision_log_per_s must be >= 0, got {per_s}")
        self.per_s = per_s
        self._logger = logger
        self._on_skipped = on_skipped
        self._clock = clock
        self._window_end = -math.inf
        self._left = 0
        self._skipped = 0

    @property
    def window_s(self) -> float:
        return max(1.0, 1.0 / self.per_s) if self.per_s else math.inf

    def admit(self) -> bool:
        if not self.per_s:
            return True
        now = self._clock()
        if now >= self._window_end:
            self._close_window()
            self._window_end = now + self.window_s
            self._left = max(1, int(self.per_s * self.window_s))
        if self._left > 0:
            self._left -= 1
            return True
        self._skipped += 1
        if self._on_skipped is not None:
            self._on_skipped()
        return False

    def flush(self) -> None:
        """Report the lines skipped in the current window now (shutdown)."""
        self._close_window()

    def _close_window(self) -> None:
        skipped, self._skipped = self._skipped, 0
        if not skipped:
            return
        self._logger.info(
            "Got pod scores: %d decision lines not logged in the last window "
            "(decision_log_per_s=%g, window %gs; 0 logs every decision)",
            skipped,
            self.per_s,
            self.window_s,
        )
