"""Blocks we expect an endpoint to hold soon: the gap between routing a request and its KV events.

An engine publishes ``BlockStored`` only after it has computed (or received) the blocks, a prefill
time later. Without this overlay a burst of requests sharing a new prefix would all see "cached
nowhere" and scatter, each paying the full prefill. When a request is routed, its block keys are
recorded here for the chosen endpoint; ``match`` treats them like indexed blocks until they expire
(``ttl_s``), by which time the engine's own events have taken over (or the blocks were never
stored, and the claim is rightly forgotten).

Layout (every decision adds one or two claims of up to ~160 keys and expires as many, so both
run as C-level passes over the claim's keys, ``map``/``zip``/``compress`` into dict methods, with
no Python frame and no allocation per key)::

    _masks[key] -> endpoint bits          what the walk reads (``live_masks``, ``match``)
    _until[endpoint][key] -> expiry        the latest claim of that endpoint on that key
    _expiries: (expiry, endpoint, keys)    claims in expiry order (the ttl is fixed)

A claim that comes due drops only the keys whose ``_until`` is still its own expiry (a later
claim of the same endpoint pushed the others out).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import compress, repeat
from operator import eq, not_

from pd_runtime.kv_events.index import leading_blocks

__all__ = ["PendingPrefixes"]

#: Runs an iterator to its end in C (the passes below are run for their side effects).
_consume = deque[object](maxlen=0).extend


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
        self._masks: dict[int, int] = {}  # key -> endpoint bits of its live claims
        self._until: dict[str, dict[int, float]] = {}  # endpoint -> key -> expiry
        self._bits: dict[str, int] = {}
        self._endpoint_of_bit: dict[int, str] = {}
        self._bit_of = bit_of
        self._next_bit = 0
        self._expiries: deque[tuple[float, str, Sequence[int]]] = deque()

    def __len__(self) -> int:
        """Distinct keys with at least one live claim."""
        return len(self._masks)

    def claimed(self, endpoint: str) -> int:
        """Keys with a live claim of ``endpoint`` (introspection and tests)."""
        self._expire(self._clock())
        return len(self._until.get(endpoint, ()))

    def add(self, endpoint: str, keys: Sequence[int]) -> None:
        if not keys or self.ttl_s <= 0:
            return
        now = self._clock()
        self._expire(now)
        expiry = now + self.ttl_s
        bit = self._bits.get(endpoint)
        if bit is None:
            if self._bit_of is not None:
                bit = self._bit_of(endpoint)
            else:  # standalone: a fresh bit (1 << len(...) would reuse a live one after a forget)
                bit = 1 << self._next_bit
                self._next_bit += 1
            self._bits[endpoint] = bit
            self._endpoint_of_bit[bit] = endpoint
        until = self._until.get(endpoint)
        if until is None:
            until = self._until[endpoint] = {}
        masks = self._masks
        # masks[k] |= bit and until[k] = expiry for every key, in C.
        masks.update(zip(keys, map(bit.__or__, map(masks.get, keys, repeat(0))), strict=True))
        until.update(zip(keys, repeat(expiry), strict=False))  # repeat() is endless
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
        until = self._until.pop(endpoint, None)
        bit = self._bits.pop(endpoint, None)
        if bit is not None:
            del self._endpoint_of_bit[bit]
            if until:
                self._clear(list(until), bit)

    def _clear(self, keys: list[int], bit: int) -> None:
        """Take ``bit`` out of the masks of ``keys`` (each holds it); drop masks left empty."""
        masks = self._masks
        left = list(map((~bit).__and__, map(masks.__getitem__, keys)))
        masks.update(zip(keys, left, strict=True))
        if not all(left):
            _consume(map(masks.pop, compress(keys, map(not_, left)), repeat(None)))

    def _expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, endpoint, keys = expiries.popleft()
            until = self._until.get(endpoint)
            if not until:  # forgotten meanwhile (or nothing left)
                continue
            # Keys still held by this claim: a later add() for the same endpoint keeps the rest.
            dead = list(compress(keys, map(eq, map(until.get, keys), repeat(expiry))))
            if not dead:
                continue
            _consume(map(until.pop, dead, repeat(None)))
            self._clear(dead, self._bits[endpoint])
