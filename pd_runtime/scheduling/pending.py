"""Blocks we expect an endpoint to hold soon: the gap between routing a request and its KV events.

An engine publishes ``BlockStored`` only after it has computed (or received) the blocks, a prefill
time later. Without this overlay a burst of requests sharing a new prefix would all see "cached
nowhere" and scatter, each paying the full prefill. When a request is routed, its block keys are
recorded here for the chosen endpoint; ``match`` treats them like indexed blocks until they expire
(``ttl_s``), by which time the engine's own events have taken over (or the blocks were never
stored, and the claim is rightly forgotten).

Claims are kept whole, indexed by their first key, not key by key::

    request Q   q0  q1  q2  q3  q4  q5  q6  q7        (chained keys: a key fixes its prefix)
    claim C             q2  q3  q4  x5  x6            C's head q2 is in Q at position 2, and C
                        |<--------->|                 agrees with Q up to its first mismatch:
    spans(Q)            (2, 5, bit of C's endpoint)    C covers Q's positions [2, 5)

A claim is a contiguous run of one prompt's chained keys (the scheduler claims ``keys[held:]``).
Since a key fixes the whole prefix before it, a claim holding some key of Q has its head in Q
too, and covers Q from there until the two chains part. So a decision adds one dict entry per
claim and expiry removes one, whatever the prompt's length, and the walk looks up one small
dict (a few thousand heads, cache-resident) instead of one of every claimed key: at 64 endpoints
and 4 requests/s each, 10 s of claims are ~2,500 heads against ~200,000 keys.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from pd_runtime.kv_events.index import claim_spans, leading_blocks

__all__ = ["PendingPrefixes", "Span"]

#: ``(start, end, bit)``: positions ``[start, end)`` of a request's keys claimed by the endpoint
#: with that bit (see :meth:`PendingPrefixes.spans`).
Span = tuple[int, int, int]


class _Claim:
    __slots__ = ("bit", "endpoint", "expiry", "keys")

    def __init__(self, expiry: float, endpoint: str, bit: int, keys: Sequence[int]) -> None:
        self.expiry = expiry
        self.endpoint = endpoint
        self.bit = bit
        self.keys = keys


class PendingPrefixes:
    """``bit_of`` maps an endpoint to its bit; pass the prefix index's ``endpoint_bit`` so that
    the claims can be laid over the index in one walk (``PrefixIndex.match(claims=``
    :meth:`live_heads` ``)``, what the scheduler does; :meth:`spans` gives the same as position
    ranges, for inspection and tests). Call :meth:`forget_endpoint` before the index forgets an
    endpoint (its bit is reused)."""

    def __init__(
        self,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        bit_of: Callable[[str], int] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._heads: dict[int, list[_Claim]] = {}  # first key -> live claims starting there
        self._bits: dict[str, int] = {}
        self._endpoint_of_bit: dict[int, str] = {}
        self._bit_of = bit_of
        self._next_bit = 0
        self._expiries: deque[_Claim] = deque()  # in expiry order (the ttl is fixed)

    def __bool__(self) -> bool:
        """Any claim, live or due (cheap: the hot path's "is there an overlay at all")."""
        return bool(self._expiries)

    def __len__(self) -> int:
        """Distinct keys with a live claim. Introspection: it visits every claimed key."""
        self._expire(self._clock())
        return len({k for c in self._expiries for k in c.keys})

    def claimed(self, endpoint: str) -> int:
        """Distinct keys with a live claim of ``endpoint`` (introspection)."""
        self._expire(self._clock())
        return len({k for c in self._expiries if c.endpoint == endpoint for k in c.keys})

    def add(self, endpoint: str, keys: Sequence[int]) -> None:
        """Claim ``keys`` (a contiguous run of one prompt's chained keys, not modified later)
        for ``endpoint`` for ``ttl_s``."""
        if not keys or self.ttl_s <= 0:
            return
        now = self._clock()
        self._expire(now)
        bit = self._bits.get(endpoint)
        if bit is None:
            if self._bit_of is not None:
                bit = self._bit_of(endpoint)
            else:  # standalone: a fresh bit (1 << len(...) would reuse a live one after a forget)
                bit = 1 << self._next_bit
                self._next_bit += 1
            self._bits[endpoint] = bit
            self._endpoint_of_bit[bit] = endpoint
        claim = _Claim(now + self.ttl_s, endpoint, bit, keys)
        head = self._heads.get(keys[0])
        if head is None:
            self._heads[keys[0]] = [claim]
        else:
            head.append(claim)
        self._expiries.append(claim)

    def spans(self, keys: Sequence[int]) -> list[Span]:
        """The live claims over ``keys``, as ``(start, end, bit)`` position ranges (expired
        claims purged first; see :func:`~pd_runtime.kv_events.index.claim_spans`)."""
        return claim_spans(keys, self.live_heads())

    def live_heads(self) -> dict[int, list[_Claim]]:
        """The live claims by first key (expired ones purged), for ``PrefixIndex.match(claims=)``:
        the walk works out their spans itself, only over the blocks it visits. Read-only."""
        self._expire(self._clock())
        return self._heads

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``keys`` expected on each endpoint (only endpoints with > 0)."""
        return leading_blocks(keys, {}, self._endpoint_of_bit, claims=self.live_heads())

    def live_masks(self) -> dict[int, int]:
        """key -> bits of the endpoints expected to hold it (introspection: every claimed key)."""
        self._expire(self._clock())
        masks: dict[int, int] = {}
        for c in self._expiries:
            for k in c.keys:
                masks[k] = masks.get(k, 0) | c.bit
        return masks

    def forget_endpoint(self, endpoint: str) -> None:
        gone = [c for c in self._expiries if c.endpoint == endpoint]
        if gone:
            self._expiries = deque(c for c in self._expiries if c.endpoint != endpoint)
            for c in gone:
                self._unhead(c)
        bit = self._bits.pop(endpoint, None)
        if bit is not None:
            del self._endpoint_of_bit[bit]

    def _unhead(self, claim: _Claim) -> None:
        head = claim.keys[0]
        claims = self._heads[head]
        if len(claims) == 1:
            del self._heads[head]
        else:
            claims.remove(claim)  # identity (no __eq__): this very claim

    def _expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0].expiry <= now:
            self._unhead(expiries.popleft())
