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
from collections.abc import Callable, Mapping, Sequence

from pd_runtime.kv_events.index import leading_blocks

__all__ = ["PendingPrefixes"]


class PendingPrefixes:
    """``bit_of`` maps an endpoint to its bit; pass the prefix index's ``endpoint_bit`` so that
    :meth:`live_masks` can be laid over the index in one walk (``PrefixIndex.match(overlay=)``).
    Call :meth:`forget_endpoint` before the index forgets an endpoint (its bit is reused)."""

    def __init__(
        self,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        bit_of: Callable[[str], int] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._holders: dict[int, dict[str, float]] = {}  # key -> endpoint -> expiry
        self._masks: dict[int, int] = {}  # key -> endpoint bits of the same holders
        self._bits: dict[str, int] = {}
        self._endpoint_of_bit: dict[int, str] = {}
        self._bit_of = bit_of
        self._expiries: deque[tuple[float, str, Sequence[int]]] = deque()

    def __len__(self) -> int:
        return len(self._holders)

    def add(self, endpoint: str, keys: Sequence[int]) -> None:
        if not keys or self.ttl_s <= 0:
            return
        now = self._clock()
        self._expire(now)
        expiry = now + self.ttl_s
        bit = self._bits.get(endpoint)
        if bit is None:
            bit = self._bit_of(endpoint) if self._bit_of else 1 << len(self._bits)
            self._bits[endpoint] = bit
            self._endpoint_of_bit[bit] = endpoint
        holders, masks = self._holders, self._masks
        for key in keys:
            per = holders.get(key)
            if per is None:
                holders[key] = {endpoint: expiry}
                masks[key] = bit
            else:
                per[endpoint] = expiry
                masks[key] |= bit
        self._expiries.append((expiry, endpoint, keys))

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``keys`` expected on each endpoint (only endpoints with > 0).

        Expired entries are purged first, so every entry left is live and the walk is the
        index's: one dict lookup and one integer AND per block.
        """
        self._expire(self._clock())
        return leading_blocks(keys, self._masks, self._endpoint_of_bit)

    def live_masks(self) -> Mapping[int, int]:
        """key -> bits of the endpoints expected to hold it, expired claims purged."""
        self._expire(self._clock())
        return self._masks

    def forget_endpoint(self, endpoint: str) -> None:
        for key in [k for k, per in self._holders.items() if endpoint in per]:
            self._drop(key, endpoint)
        bit = self._bits.pop(endpoint, None)
        if bit is not None:
            del self._endpoint_of_bit[bit]

    def _drop(self, key: int, endpoint: str) -> None:
        per = self._holders[key]
        del per[endpoint]
        if per:
            self._masks[key] &= ~self._bits[endpoint]
        else:
            del self._holders[key]
            del self._masks[key]

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expiry, endpoint, keys = self._expiries.popleft()
            for key in keys:
                per = self._holders.get(key)
                # A later add() for the same endpoint pushed the expiry out: keep it.
                if per is not None and per.get(endpoint) == expiry:
                    self._drop(key, endpoint)
