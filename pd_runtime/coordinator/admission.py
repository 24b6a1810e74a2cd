"""Admission control: a bound on generation requests in flight, with a short priority queue.

::

    arrival ──▶ slot free and nobody queued? ──yes──▶ in flight (until the response ends)
                    │ no
                    ▼
                queue has room? ──yes──▶ wait (≤ queue_timeout_s) ──slot handed over──▶ in flight
                    │ no                      │ timeout: 429 queue_timeout
                    ▼                         │ displaced: 429 displaced
                newest queued request of lower priority? ──yes──▶ it gets 429 displaced; wait
                    │ no
                    ▼
                429 queue_full (at once)

A released slot goes straight to the queued request of highest priority (first come, first
served among equals), so the invariant is: someone queued ⇒ every slot taken. All of it runs on
the event loop: no locks, and no polling (waiters sleep on a future).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field

from pd_runtime.errors import RateLimitError

__all__ = ["AdmissionController"]


@dataclass(eq=False)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(repr=False)


class AdmissionController:
    def __init__(self, max_in_flight: int, max_queued: int, queue_timeout_s: float) -> None:
        if max_in_flight < 1 or max_queued < 0 or queue_timeout_s <= 0:
            raise ValueError("need max_in_flight >= 1, max_queued >= 0, queue_timeout_s > 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = max(1, math.ceil(queue_timeout_s))
        self.in_flight = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    def _reject(self, reason: str, message: str) -> RateLimitError:
        return RateLimitError(
            f"{message}; retry after {self.retry_after_s}s",
            reason=reason,
            retry_after_s=self.retry_after_s,
        )

    @property
    def slot_free(self) -> bool:
        """Whether :meth:`acquire` would return at once, without queueing."""
        return self.in_flight < self.max_in_flight and not any(
            not w.future.done() for w in self._waiters
        )

    async def acquire(self, priority: int = 0) -> None:
        """Take an in-flight slot, waiting in the queue if need be; raises ``RateLimitError``.
        Every successful ``acquire`` must be paired with one ``release``."""
        self._waiters = [w for w in self._waiters if not w.future.done()]
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queued:
            victim = self._lowest()
            if victim is None or victim.priority >= priority:
                raise self._reject("queue_full", "the coordinator is at capacity")
            self._waiters.remove(victim)
            victim.future.set_exception(
                self._reject("displaced", "displaced from the queue by a higher-priority request")
            )
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter.future
        except TimeoutError:
            if self._granted(waiter):  # the slot came just as the timer fired: keep it
                return
            self._discard(waiter)
            raise self._reject(
                "queue_timeout", f"no capacity within {self.queue_timeout_s}s"
            ) from None
        except asyncio.CancelledError:
            if self._granted(waiter):
                self.release()  # hand the slot on: this request will never use it
            else:
                self._discard(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the best queued request, or to the pool."""
        while self._waiters:
            best = max(self._waiters, key=lambda w: (w.priority, -w.seq))
            self._waiters.remove(best)
            if not best.future.done():
                best.future.set_result(None)  # the slot changes hands; in_flight stays
                return
        self.in_flight -= 1
        assert self.in_flight >= 0, "release() without acquire()"

    def _lowest(self) -> _Waiter | None:
        """The queued request to shed first: lowest priority, newest among equals."""
        live = [w for w in self._waiters if not w.future.done()]
        return min(live, key=lambda w: (w.priority, -w.seq)) if live else None

    @staticmethod
    def _granted(waiter: _Waiter) -> bool:
        f = waiter.future
        return f.done() and not f.cancelled() and f.exception() is None

    def _discard(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()
