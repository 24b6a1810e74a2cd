"""PrefixIndex: which endpoint holds which blocks, in which tier, fed by KV events.

Three maps, kept consistent (``check_integrity`` verifies it)::

    _endpoints[endpoint][medium][engine_hash] -> key   per publisher: resolves parents and removals
    _held[medium][key] -> endpoint bitmask             who holds a key in a tier, one bit per
                                                       endpoint (``endpoint_bit``)
    _any[key] -> endpoint bitmask                      the same in any tier: what ``match`` walks
                                                       (an AND per block)
    _dupes[(endpoint, medium, key)] -> extra refs      rare: two engine hashes -> one key

While a single tier is in use (the usual deployment: GPU only), ``_held[that tier]`` *is* the
``_any`` dict (the same object), so a stored block costs one mask update instead of two; the
second tier to appear gets its own dict and ``_any`` becomes a copy. Why masks rather than a
``{endpoint: tiers}`` dict per key: no dict to allocate per key, and one int per key for its
holders; applying events got ~1.35x faster and an indexed entry went from 149 to 90 bytes
(``benchmarks/results/2026-12-06-ingest``).

``key`` is ours (:mod:`pd_runtime.kv_events.keys`), so the same tokens on two engines with
different hash seeds share one mask entry; engine hashes never leave their endpoint's map.

Event handling (all idempotent, none raises on odd but well-typed events; oddities are counted):

* BlockStored: keys chained from the parent's key. A *parent unknown* to the endpoint (events
  missed, or the parent's store came before we subscribed) makes the blocks unreachable from the
  root, and ``match`` only walks from the root, so they are dropped and counted in
  ``stats.orphan_blocks``; their children are then orphans too, until the engine stores the chain
  again. Placeholders (no tokens, from offloading connectors) are resolved through the same
  endpoint's other tiers, or dropped (``stats.unkeyable_blocks``, as are blocks whose
  ``token_ids`` is not an array of ints). Re-stores of known blocks
  (vLLM 0.32 re-emits reused prefix blocks) are no-ops.
* BlockRemoved: unknown hashes are counted (``stats.unknown_removals``), not errors.
* AllBlocksCleared: clears every tier of the endpoint (the event names no medium; dropping too
  much only costs a missed hit, keeping too much would route to a cold cache).
* Events of KV cache groups other than ``group_idx`` (hybrid models) are ignored and counted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, count
from typing import Any, Protocol

from pd_runtime.errors import PDRuntimeError
from pd_runtime.kv_events.events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlockHash,
    EventDecodeError,
    decode_token_ids,
)
from pd_runtime.kv_events.keys import ROOT_KEY, BlockKey, chain_keys
from pd_runtime.kv_events.native import native

__all__ = [
    "Claim",
    "IndexIntegrityError",
    "IndexStats",
    "PrefixIndex",
    "claim_spans",
    "leading_blocks",
    "leading_blocks_py",
]

_Tier = dict[EngineBlockHash, BlockKey]


class Claim(Protocol):
    """Blocks an endpoint is expected to hold soon (the scheduler's pending overlay): ``keys``,
    a contiguous run of one prompt's chained keys, for the endpoint with ``bit``."""

    @property
    def keys(self) -> Sequence[BlockKey]: ...

    @property
    def bit(self) -> int: ...


#: Claims by their first key: what ``claims=`` of :func:`leading_blocks` takes.
ClaimsByHead = Mapping[BlockKey, Sequence[Claim]]


def claim_spans(keys: Sequence[BlockKey], claims: ClaimsByHead) -> list[tuple[int, int, int]]:
    """The ``claims`` over ``keys`` as ``(start, end, bit)`` position ranges.

    Keys are chained, so a claim holding some key of ``keys`` has its head in ``keys`` too and
    agrees with them from there until the two chains part: one lookup per key in the (small)
    dict of heads, in C, and for each claim found one comparison (or a bisection where the
    chains part)."""
    if not claims:
        return []
    out: list[tuple[int, int, int]] = []
    n = len(keys)
    for i in compress(count(), map(claims.__contains__, keys)):
        for claim in claims[keys[i]]:
            ck = claim.keys
            m = min(len(ck), n - i)
            # Usually the last shared position agrees (the whole claim, or the whole rest of
            # the prompt, is covered): one comparison.
            if ck[m - 1] == keys[i + m - 1]:
                length = m
            else:  # bisect for the first position that differs
                lo, hi = 1, m - 1  # ck[0] == keys[i] (the head), ck[m - 1] differs
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if ck[mid] == keys[i + mid]:
                        lo = mid + 1
                    else:
                        hi = mid - 1
                length = lo
            out.append((i, i + length, claim.bit))
    return out


def leading_blocks(
    keys: Sequence[BlockKey],
    masks: Mapping[BlockKey, int],
    endpoint_of_bit: Mapping[int, str],
    overlay: Mapping[BlockKey, int] | None = None,
    spans: Sequence[tuple[int, int, int]] | None = None,
    claims: ClaimsByHead | None = None,
) -> dict[str, int]:
    """How many leading ``keys`` each endpoint holds, from per-key endpoint bitmasks: one dict
    lookup and one integer AND per block, stopping when every endpoint has missed.

    Two ways to add holders the masks do not know (the scheduler's pending overlay): ``overlay``
    (key -> bits, ORed in per key: a second lookup per block) and ``spans`` (``(start, end,
    bit)``: positions ``[start, end)`` of ``keys`` held by ``bit``; no lookup at all, the bits
    are switched on and off as the walk passes the spans' ends).

    ``claims`` (:data:`ClaimsByHead`) are spans not yet worked out: :func:`claim_spans` of them
    is added to ``spans``. Compiled, each is worked out when the walk reaches its head, so
    a prompt's keys are visited once and only up to where the walk stops.

    Runs compiled (:mod:`.native`) without ``overlay`` for up to 1,024 endpoints, else
    :func:`leading_blocks_py`; the two give the same dict, order included."""
    if native is not None and not overlay:
        found = native.leading_blocks(keys, masks, endpoint_of_bit, spans, claims or None)
        if found is not NotImplemented:
            return found
    if claims:
        spans = [*(spans or ()), *claim_spans(keys, claims)]
    return leading_blocks_py(keys, masks, endpoint_of_bit, overlay, spans)


def leading_blocks_py(
    keys: Sequence[BlockKey],
    masks: Mapping[BlockKey, int],
    endpoint_of_bit: Mapping[int, str],
    overlay: Mapping[BlockKey, int] | None = None,
    spans: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, int]:
    """:func:`leading_blocks` in Python: the reference of the compiled walk, and what runs with
    an ``overlay``, beyond 1,024 endpoints or where the extension is absent."""
    extra = overlay or {}
    # spans as position events: +bit where a span starts, -bit where it ends (counted per bit,
    # since spans of one endpoint may overlap).
    events = sorted(e for s, t, b in spans if t > s for e in ((s, b), (t, -b))) if spans else []
    n_events = len(events)
    at = events[0][0] if events else -1
    j = pend = 0
    live: dict[int, int] = {}
    result: dict[str, int] = {}
    alive = 0
    i = 0
    for i, key in enumerate(keys):
        if i == at:
            while j < n_events and events[j][0] == i:
                b = events[j][1]
                j += 1
                if b > 0:
                    live[b] = live.get(b, 0) + 1
                    pend |= b
                elif live[-b] > 1:
                    live[-b] -= 1
                else:
                    del live[-b]
                    pend &= b - 1  # ~(-b) == b - 1 for b < 0: clear the bit
            at = events[j][0] if j < n_events else -1
        here = masks.get(key, 0) | pend
        if extra:
            here |= extra.get(key, 0)
        if i == 0:
            alive = here
        elif here & alive != alive:
            gone = alive & ~here
            alive &= here
            while gone:
                low = gone & -gone
                result[endpoint_of_bit[low]] = i
                gone ^= low
        if not alive:
            break
    else:
        i = len(keys)
    while alive:
        low = alive & -alive
        result[endpoint_of_bit[low]] = i
        alive ^= low
    return result


class IndexIntegrityError(PDRuntimeError):
    """``check_integrity`` found the maps disagreeing (a bug in the index, never in the input)."""


@dataclass(slots=True)
class IndexStats:
    """Counters in blocks (not events) since the index was created."""

    stored: int = 0
    duplicate_stores: int = 0
    orphan_blocks: int = 0
    unkeyable_blocks: int = 0
    removed: int = 0
    unknown_removals: int = 0
    ignored_other_group: int = 0
    clears: int = 0


class PrefixIndex:
    """Prefix-cache index over many endpoints; not thread-safe (use from one event loop)."""

    __slots__ = (
        "_any",
        "_dupes",
        "_endpoint_bit",
        "_endpoint_of_bit",
        "_endpoints",
        "_free_bits",
        "_held",
        "group_idx",
        "stats",
    )

    def __init__(self, *, group_idx: int = 0) -> None:
        #: The KV cache group indexed; events with ``group_idx=None`` count as this group.
        self.group_idx = group_idx
        self.stats = IndexStats()
        self._endpoints: dict[str, dict[str, _Tier]] = {}
        self._held: dict[str, dict[BlockKey, int]] = {}
        self._any: dict[BlockKey, int] = {}
        self._dupes: dict[tuple[str, str, BlockKey], int] = {}
        self._endpoint_bit: dict[str, int] = {}
        self._endpoint_of_bit: dict[int, str] = {}
        self._free_bits: list[int] = []

    # ---- keys and queries -------------------------------------------------------------------

    @staticmethod
    def block_keys(
        token_ids: Sequence[int],
        block_size: int,
        extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> list[BlockKey]:
        """Chained keys of a request's full blocks (see :func:`~.keys.chain_keys`)."""
        return chain_keys(ROOT_KEY, token_ids, block_size, extra_keys)

    def match(
        self,
        keys: Sequence[BlockKey],
        *,
        media: Collection[str] | None = None,
        overlay: Mapping[BlockKey, int] | None = None,
        spans: Sequence[tuple[int, int, int]] | None = None,
        claims: ClaimsByHead | None = None,
    ) -> dict[str, int]:
        """Leading blocks of ``keys`` each endpoint holds, stopping at its first miss.

        Only endpoints with at least one block appear. ``media`` restricts which tiers count
        (default: any). ``overlay`` adds holders the index does not know yet (key -> endpoint
        bits from :meth:`endpoint_bit`), ``spans`` the same as position ranges of ``keys``
        (``(start, end, bit)``), ``claims`` as claims by first key (the scheduler's pending
        overlay; see :func:`leading_blocks`); any-tier only.
        Cost: one dict lookup and one integer AND per block until every endpoint has missed.
        """
        if media is None:
            return leading_blocks(keys, self._any, self._endpoint_of_bit, overlay, spans, claims)
        if overlay is not None or spans or claims:
            raise ValueError("overlay, spans and claims need matching any medium")
        held = [self._held[m] for m in set(media) if m in self._held]
        if len(held) == 1:
            return leading_blocks(keys, held[0], self._endpoint_of_bit)
        masks: dict[BlockKey, int] = {}  # several tiers (rare): their masks ORed, for these keys
        for tier_masks in held:
            for key in keys:
                bits = tier_masks.get(key)
                if bits:
                    masks[key] = masks.get(key, 0) | bits
        return leading_blocks(keys, masks, self._endpoint_of_bit)

    def endpoint_bit(self, endpoint: str) -> int:
        """The endpoint's bit in :meth:`match`'s ``overlay`` masks (allocated on first use)."""
        return self._bit_of(endpoint)

    def size(self) -> int:
        """Distinct keys held by at least one endpoint."""
        return len(self._any)

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def endpoint_counts(self) -> dict[str, dict[str, int]]:
        """Blocks per endpoint per medium (engine hashes, so duplicates count twice)."""
        return {e: {m: len(t) for m, t in tiers.items()} for e, tiers in self._endpoints.items()}

    # ---- updates ----------------------------------------------------------------------------

    def apply(self, endpoint: str, event: BlockStored | BlockRemoved | AllBlocksCleared) -> None:
        """Apply one event published by ``endpoint``; registers the endpoint if new."""
        if isinstance(event, BlockStored):
            self._store(endpoint, event)
        elif isinstance(event, BlockRemoved):
            self._remove(endpoint, event)
        elif isinstance(event, AllBlocksCleared):
            self.clear(endpoint)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def apply_batch(
        self, endpoint: str, events: Sequence[BlockStored | BlockRemoved | AllBlocksCleared]
    ) -> None:
        for event in events:
            self.apply(endpoint, event)

    def add_endpoint(self, endpoint: str) -> None:
        """Register an endpoint with no blocks (``match`` will still omit it)."""
        self._endpoints.setdefault(endpoint, {})

    def clear(self, endpoint: str) -> None:
        """Forget the endpoint's blocks but keep it registered (AllBlocksCleared, event gaps)."""
        self.stats.clears += 1
        self._drop_all(endpoint)
        self._endpoints[endpoint] = {}

    def remove_endpoint(self, endpoint: str) -> None:
        """Forget the endpoint entirely; unknown endpoints are ignored."""
        self._drop_all(endpoint)
        self._endpoints.pop(endpoint, None)
        bit = self._endpoint_bit.pop(endpoint, None)
        if bit is not None:
            del self._endpoint_of_bit[bit]
            self._free_bits.append(bit)

    def _bit_of(self, endpoint: str) -> int:
        """The endpoint's bit in the masks (slots of removed endpoints are reused)."""
        bit = self._endpoint_bit.get(endpoint)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._endpoint_bit)
            self._endpoint_bit[endpoint] = bit
            self._endpoint_of_bit[bit] = endpoint
        return bit

    # ---- internals --------------------------------------------------------------------------

    def _tier(self, endpoint: str, medium: str) -> _Tier:
        tiers = self._endpoints.get(endpoint)
        if tiers is None:
            tiers = self._endpoints[endpoint] = {}
        tier = tiers.get(medium)
        if tier is None:
            tier = tiers[medium] = {}
        return tier

    def _held_in(self, medium: str) -> dict[BlockKey, int]:
        """The masks of ``medium``: while it is the only tier, the ``_any`` dict itself."""
        held = self._held.get(medium)
        if held is None:
            if not self._held:
                held = self._any
            else:
                if len(self._held) == 1:  # a second tier: the any-tier masks become their own
                    self._any = dict(self._any)
                held = {}
            self._held[medium] = held
        return held

    def _lookup(self, endpoint: str, engine_hash: EngineBlockHash) -> BlockKey | None:
        """Our key for an engine hash in any tier of the endpoint (hashes are tier-independent)."""
        for tier in self._endpoints.get(endpoint, {}).values():
            key = tier.get(engine_hash)
            if key is not None:
                return key
        return None

    def _store(self, endpoint: str, ev: BlockStored) -> None:
        hashes = ev.block_hashes
        if ev.group_idx is not None and ev.group_idx != self.group_idx:
            self.stats.ignored_other_group += len(hashes)
            return
        medium = ev.medium or MEDIUM_GPU
        tier = self._tier(endpoint, medium)
        bs = ev.block_size
        if native is not None and not ev.extra_keys and bs > 0:
            # Keyed straight from the msgpack bytes, no list of ints made. Anything odd (a
            # placeholder, bad token ids, an unknown parent) takes the Python path below, which
            # counts it as before.
            parent: BlockKey | None = ROOT_KEY
            if ev.parent_block_hash is not None:
                parent = self._lookup(endpoint, ev.parent_block_hash)
            if parent is not None:
                keys = native.chain_keys_msgpack(parent, ev.token_ids, bs, len(hashes))
                if keys is not None:
                    self._insert(endpoint, medium, tier, hashes, keys)
                    return
        try:
            tokens = decode_token_ids(ev.token_ids)
        except EventDecodeError:  # not an array of ints: nothing to key the blocks with
            self.stats.unkeyable_blocks += len(hashes)
            return
        if bs <= 0 or len(tokens) != len(hashes) * bs:
            for h in hashes:  # placeholder: only the hash; find it in another tier
                found = self._lookup(endpoint, h)
                if found is None:
                    self.stats.unkeyable_blocks += 1
                else:
                    self._add(endpoint, medium, tier, h, found)
            return
        parent = ROOT_KEY
        if ev.parent_block_hash is not None:
            found = self._lookup(endpoint, ev.parent_block_hash)
            if found is None:
                self.stats.orphan_blocks += len(hashes)
                return
            parent = found
        self._insert(endpoint, medium, tier, hashes, chain_keys(parent, tokens, bs, ev.extra_keys))

    def _insert(
        self,
        endpoint: str,
        medium: str,
        tier: _Tier,
        hashes: Sequence[EngineBlockHash],
        keys: Sequence[BlockKey],
    ) -> None:
        """Record a stored event's blocks (``hashes[i]`` keyed ``keys[i]``)."""
        # _add inlined for the usual case (a new engine hash): ingestion runs this once per block.
        held = self._held_in(medium)
        any_masks = self._any
        ep_bit = self._bit_of(endpoint)
        if native is not None and any_masks is held:
            # Compiled, block by block in order: the usual case in C, any other block by _add
            # (the same rules as the loop below), then C again from the next one.
            n, i = len(hashes), 0
            while i < n:
                done = native.insert_new(tier, held, hashes, keys, ep_bit, i)
                self.stats.stored += done - i
                if done < n:
                    self._add(endpoint, medium, tier, hashes[done], keys[done])
                i = done + 1
            return
        new = 0
        for h, key in zip(hashes, keys, strict=True):
            if h in tier:  # a re-store (vLLM re-emits reused blocks) or a new key for the hash
                self._add(endpoint, medium, tier, h, key)
                continue
            tier[h] = key
            new += 1
            bits = held.get(key, 0)
            if bits & ep_bit:
                d = (endpoint, medium, key)
                self._dupes[d] = self._dupes.get(d, 0) + 1
            else:
                held[key] = bits | ep_bit
                if any_masks is not held:
                    any_masks[key] = any_masks.get(key, 0) | ep_bit
        self.stats.stored += new

    def _add(self, endpoint: str, medium: str, tier: _Tier, h: EngineBlockHash, key: int) -> None:
        old = tier.get(h)
        if old == key:
            self.stats.duplicate_stores += 1
            return
        if old is not None:  # same engine hash, new key (block size changed): replace
            self._drop(endpoint, medium, tier, h)
        tier[h] = key
        self.stats.stored += 1
        held = self._held_in(medium)
        ep_bit = self._bit_of(endpoint)
        bits = held.get(key, 0)
        if bits & ep_bit:
            d = (endpoint, medium, key)
            self._dupes[d] = self._dupes.get(d, 0) + 1
        else:
            held[key] = bits | ep_bit
            if self._any is not held:
                self._any[key] = self._any.get(key, 0) | ep_bit

    def _drop(self, endpoint: str, medium: str, tier: _Tier, h: EngineBlockHash) -> bool:
        key = tier.pop(h, None)
        if key is None:
            return False
        if self._dupes:
            d = (endpoint, medium, key)
            refs = self._dupes.get(d)
            if refs is not None:
                if refs > 1:
                    self._dupes[d] = refs - 1
                else:
                    del self._dupes[d]
                return True
        self._clear_bit(key, endpoint, medium)
        return True

    def _clear_bit(self, key: BlockKey, endpoint: str, medium: str) -> None:
        """``endpoint`` no longer holds ``key`` in ``medium``; forget empty entries."""
        ep_bit = self._endpoint_bit[endpoint]
        held = self._held[medium]
        bits = held[key] & ~ep_bit
        if bits:
            held[key] = bits
        else:
            del held[key]
        if self._any is held:
            return
        for other, other_held in self._held.items():
            if other != medium and other_held.get(key, 0) & ep_bit:
                return  # still held by the endpoint in another tier
        bits = self._any[key] & ~ep_bit
        if bits:
            self._any[key] = bits
        else:
            del self._any[key]

    def _remove(self, endpoint: str, ev: BlockRemoved) -> None:
        if ev.group_idx is not None and ev.group_idx != self.group_idx:
            self.stats.ignored_other_group += len(ev.block_hashes)
            return
        medium = ev.medium or MEDIUM_GPU
        tier = self._tier(endpoint, medium)
        for h in ev.block_hashes:
            if self._drop(endpoint, medium, tier, h):
                self.stats.removed += 1
            else:
                self.stats.unknown_removals += 1

    def _drop_all(self, endpoint: str) -> None:
        for medium, tier in self._endpoints.get(endpoint, {}).items():
            for key in set(tier.values()):
                self._clear_bit(key, endpoint, medium)
        if self._dupes:
            self._dupes = {d: n for d, n in self._dupes.items() if d[0] != endpoint}

    def check_integrity(self) -> None:
        """Recompute the masks and ``_dupes`` from the per-endpoint maps; raise on mismatch."""
        held: dict[str, dict[BlockKey, int]] = {}
        refs: dict[tuple[str, str, BlockKey], int] = {}
        for endpoint, tiers in self._endpoints.items():
            for medium, tier in tiers.items():
                if not tier:
                    continue
                bit = self._endpoint_bit.get(endpoint, 0)
                per = held.setdefault(medium, {})
                for key in tier.values():
                    per[key] = per.get(key, 0) | bit
                    refs[(endpoint, medium, key)] = refs.get((endpoint, medium, key), 0) + 1
        if held != {m: masks for m, masks in self._held.items() if masks}:
            bad = {
                (m, k)
                for m in held.keys() | self._held.keys()
                for k in held.get(m, {}).keys() | self._held.get(m, {}).keys()
                if held.get(m, {}).get(k) != self._held.get(m, {}).get(k)
            }
            raise IndexIntegrityError(f"tier masks disagree with endpoint maps for {len(bad)} keys")
        dupes = {d: n - 1 for d, n in refs.items() if n > 1}
        if dupes != self._dupes:
            raise IndexIntegrityError(f"duplicate refs disagree: {dupes} != {self._dupes}")
        any_masks: dict[BlockKey, int] = {}
        for masks in held.values():
            for key, bits in masks.items():
                any_masks[key] = any_masks.get(key, 0) | bits
        if any_masks != self._any:
            raise IndexIntegrityError("any-tier masks disagree with the tier masks")
