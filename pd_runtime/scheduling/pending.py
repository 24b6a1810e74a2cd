"""Blocks we expect an endpoint to hold soon: the gap between routing a request and its KV events.

An engine publishes ``BlockStored`` only after it has computed (or received) the blocks, a prefill
time later. Without this overlay a burst of requests sharing a new prefix would all see "cached
nowhere" and scatter, each paying the full prefill. When a request is routed, its block keys are
recorded here for the chosen endpoint; ``match`` treats them like indexed blocks until they expire
(``ttl_s``), by which time the engine's own events have taken over (or the blocks were never
stored, and the claim is rightly forgotten).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["PendingPrefixes"]


class PendingPrefixes:
    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._holders: dict[int, dict[str, float]] = {}  # key -> endpoint -> expiry
        self._expiries: deque[tuple[float, str, Sequence[int]]] = deque()

    def __len__(self) -> int:
        return len(self._holders)

    def add(self, endpoint: str, keys: Sequence[int]) -> None:
        if not keys or self.ttl_s <= 0:
            return
        now = self._clock()
        self._expire(now)
        expiry = now + self.ttl_s
        for key in keys:
            per = self._holders.get(key)
            if per is None:
                self._holders[key] = {endpoint: expiry}
            else:
                per[endpoint] = expiry
        self._expiries.append((expiry, endpoint, keys))

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``keys`` expected on each endpoint (only endpoints with > 0)."""
        now = self._clock()
        self._expire(now)
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for i, key in enumerate(keys):
            per = self._holders.get(key)
            here = {e for e, t in per.items() if t > now} if per else set()
            if alive is None:
                alive = here
            for gone in alive - here:
                result[gone] = i
            alive &= here
            if not alive:
                return result
        for endpoint in alive or ():
            result[endpoint] = len(keys)
        return result

    def forget_endpoint(self, endpoint: str) -> None:
        for key in [k for k, per in self._holders.items() if endpoint in per]:
            per = self._holders[key]
            del per[endpoint]
            if not per:
                del self._holders[key]

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, endpoint, keys = self._expiries.popleft()
            for key in keys:
                per = self._holders.get(key)
                # A later add() for the same endpoint pushed the expiry out: keep it.
                if per is not None and per.get(endpoint) == expiry:
                    del per[endpoint]
                    if not per:
                        del self._holders[key]
