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
from itertools import compress, repeat
from operator import and_, eq, not_, or_

from pd_runtime.kv_events.index import leading_blocks

__all__ = ["PendingPrefixes"]


class PendingPrefixes:
    """``bit_of`` maps an endpoint to its bit; pass the prefix index's ``endpoint_bit`` so that
    :meth:`live_masks` can be laid over the index in one walk (``PrefixIndex.match(overlay=)``).
    Call :meth:`forget_endpoint` before the index forgets an endpoint (its bit is reused).

    Per endpoint, key -> expiry of its latest claim; per key, the bits of its claimants. A claim
    is a few hundred keys; ``add`` and the expiry of a claim run in C (``map`` / ``zip`` /
    ``compress`` over the keys into ``dict.update``), not as a Python loop per key."""

    def __init__(
        self,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        bit_of: Callable[[str], int] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[str, dict[int, float]] = {}  # endpoint -> key -> expiry
        self._masks: dict[int, int] = {}  # key -> endpoint bits of its claimants
        self._bits: dict[str, int] = {}
        self._endpoint_of_bit: dict[int, str] = {}
        self._bit_of = bit_of
        self._expiries: deque[tuple[float, str, Sequence[int]]] = deque()

    def __len__(self) -> int:
        return len(self._masks)

    @property
    def _holders(self) -> dict[int, dict[str, float]]:
        """key -> endpoint -> expiry (built on demand: for tests and debugging)."""
        holders: dict[int, dict[str, float]] = {}
        for endpoint, per in self._expiry.items():
            for key, expiry in per.items():
                holders.setdefault(key, {})[endpoint] = expiry
        return holders

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
        per = self._expiry.get(endpoint)
        if per is None:
            per = self._expiry[endpoint] = {}
        masks = self._masks
        masks.update(
            zip(keys, map(or_, map(masks.get, keys, repeat(0)), repeat(bit)), strict=False)
        )
        per.update(zip(keys, repeat(expiry)))
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
        per = self._expiry.pop(endpoint, None)
        bit = self._bits.pop(endpoint, None)
        if bit is None:
            return
        del self._endpoint_of_bit[bit]
        if per:
            self._clear(list(per), bit)

    def _clear(self, keys: list[int], bit: int) -> None:
        """Clear ``bit`` in the masks of ``keys`` (all present), dropping masks left empty."""
        masks = self._masks
        cleared = list(map(and_, map(masks.__getitem__, keys), repeat(~bit)))
        masks.update(zip(keys, cleared, strict=True))
        empty = list(compress(keys, map(not_, cleared)))
        if empty:
            deque(map(masks.pop, empty, repeat(None)), maxlen=0)

    def _expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, endpoint, keys = expiries.popleft()
            per = self._expiry.get(endpoint)
            if not per:
                continue
            # A later add() for the same endpoint pushed a key's expiry out: keep that one.
            stale = list(compress(keys, map(eq, map(per.get, keys), repeat(expiry))))
            if not stale:
                continue
            deque(map(per.pop, stale, repeat(None)), maxlen=0)
            self._clear(stale, self._bits[endpoint])
