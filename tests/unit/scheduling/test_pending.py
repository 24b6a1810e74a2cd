"""PendingPrefixes: leading-block matching, expiry on an injected clock, re-adds, forgetting."""

from __future__ import annotations

import pytest

from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.pending import PendingPrefixes

from .common import BS, A, B

KEYS = PrefixIndex.block_keys(list(range(100, 120)), BS)  # 5 blocks
OTHER = PrefixIndex.block_keys(list(range(500, 520)), BS)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pending(clock: Clock) -> PendingPrefixes:
    return PendingPrefixes(ttl_s=10.0, clock=clock)


def test_match_counts_leading_blocks_per_endpoint(pending: PendingPrefixes) -> None:
    pending.add(A, KEYS[:3])
    pending.add(B, KEYS)
    assert pending.match(KEYS) == {A: 3, B: 5}
    assert pending.match(KEYS[:2]) == {A: 2, B: 2}
    assert pending.match([*KEYS[:4], OTHER[0]]) == {A: 3, B: 4}
    assert pending.match(OTHER) == {}
    assert pending.match([]) == {}
    assert len(pending) == 5


def test_match_stops_at_the_first_missing_block(pending: PendingPrefixes) -> None:
    pending.add(A, KEYS[1:])  # everything but the first block: no leading run
    assert pending.match(KEYS) == {}
    pending.add(B, [KEYS[0], KEYS[1], KEYS[3]])  # a hole at block 2
    assert pending.match(KEYS) == {B: 2}


def test_claims_expire_after_ttl(pending: PendingPrefixes, clock: Clock) -> None:
    pending.add(A, KEYS)
    clock.now += 9.99
    assert pending.match(KEYS) == {A: 5}
    clock.now += 0.01  # exactly the expiry: gone
    assert pending.match(KEYS) == {}
    assert len(pending) == 0  # and purged, not only hidden


def test_expiry_is_per_endpoint(pending: PendingPrefixes, clock: Clock) -> None:
    pending.add(A, KEYS)
    clock.now += 5
    pending.add(B, KEYS[:2])
    clock.now += 6  # A expired, B has 4 s left
    assert pending.match(KEYS) == {B: 2}
    assert len(pending) == 2
    clock.now += 4
    assert pending.match(KEYS) == {}
    assert len(pending) == 0


def test_re_add_extends_expiry(pending: PendingPrefixes, clock: Clock) -> None:
    pending.add(A, KEYS)
    clock.now += 5
    pending.add(A, KEYS)  # routed again: the claim lives 10 s from now
    clock.now += 7  # past the first expiry (10 s), before the second (15 s)
    assert pending.match(KEYS) == {A: 5}
    assert len(pending) == 5
    clock.now += 3
    assert pending.match(KEYS) == {}


def test_re_add_of_a_shorter_prefix_extends_only_those_blocks(
    pending: PendingPrefixes, clock: Clock
) -> None:
    pending.add(A, KEYS)
    clock.now += 5
    pending.add(A, KEYS[:2])
    clock.now += 7
    assert pending.match(KEYS) == {A: 2}
    assert len(pending) == 2


def test_add_of_the_same_keys_at_the_same_instant(pending: PendingPrefixes, clock: Clock) -> None:
    pending.add(A, KEYS)
    pending.add(A, KEYS)
    clock.now += 9
    assert pending.match(KEYS) == {A: 5}
    clock.now += 1
    assert pending.match(KEYS) == {}
    assert len(pending) == 0


def test_zero_ttl_disables_the_overlay(clock: Clock) -> None:
    off = PendingPrefixes(ttl_s=0, clock=clock)
    off.add(A, KEYS)
    assert off.match(KEYS) == {}
    assert len(off) == 0


def test_forget_endpoint(pending: PendingPrefixes, clock: Clock) -> None:
    pending.add(A, KEYS)
    pending.add(B, KEYS[:2])
    pending.forget_endpoint(A)
    assert pending.match(KEYS) == {B: 2}
    assert len(pending) == 2
    pending.forget_endpoint("unknown:1")  # no-op
    pending.forget_endpoint(B)
    assert pending.match(KEYS) == {}
    assert len(pending) == 0
    # The forgotten claims' expiry records are harmless when they come due...
    clock.now += 11
    assert pending.match(KEYS) == {}
    # ...and a claim made after forgetting is kept for its own ttl.
    pending.add(A, KEYS[:1])
    clock.now += 9
    assert pending.match(KEYS) == {A: 1}


def test_expired_records_do_not_remove_a_later_claim_after_forget(
    pending: PendingPrefixes, clock: Clock
) -> None:
    pending.add(A, KEYS)
    pending.forget_endpoint(A)
    clock.now += 5
    pending.add(A, KEYS)  # new claim, expiry 15 s after start
    clock.now += 6  # the first (forgotten) record is due now
    assert pending.match(KEYS) == {A: 5}


class _Reference:
    """The overlay's meaning, spelt out: key -> endpoint -> expiry of its latest claim."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.until: dict[int, dict[str, float]] = {}

    def add(self, now: float, endpoint: str, keys: list[int]) -> None:
        for key in keys:
            self.until.setdefault(key, {})[endpoint] = now + self.ttl_s

    def forget(self, endpoint: str) -> None:
        for per in self.until.values():
            per.pop(endpoint, None)

    def match(self, now: float, keys: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for endpoint in {e for per in self.until.values() for e in per}:
            n = 0
            for key in keys:
                if self.until.get(key, {}).get(endpoint, -1.0) <= now:
                    break
                n += 1
            if n:
                out[endpoint] = n
        return out

    def live(self, now: float) -> int:
        return sum(any(t > now for t in per.values()) for per in self.until.values())


@pytest.mark.parametrize("seed", range(8))
def test_random_claims_match_the_reference(seed: int, clock: Clock, implementation: str) -> None:
    import random

    rng = random.Random(seed)
    pending = PendingPrefixes(ttl_s=3.0, clock=clock)
    ref = _Reference(3.0)
    endpoints = [f"10.0.0.{i}:8000" for i in range(5)]
    chains = [PrefixIndex.block_keys([rng.randrange(50) for _ in range(12 * BS)], BS)]
    for _ in range(5):  # chains sharing heads, as prompts sharing a system prompt do
        base = rng.choice(chains)
        cut = rng.randrange(len(base))
        tail = PrefixIndex.block_keys([rng.randrange(1000) for _ in range(8 * BS)], BS)
        chains.append(base[:cut] + [k ^ rng.getrandbits(40) for k in tail])
    for _ in range(300):
        clock.now += rng.choice((0.0, 0.1, 0.5, 1.0, 2.5))
        op = rng.random()
        endpoint = rng.choice(endpoints)
        chain = rng.choice(chains)
        if op < 0.6:
            lo = rng.randrange(len(chain))
            keys = chain[lo : rng.randint(lo, len(chain))]
            pending.add(endpoint, keys)
            if keys:
                ref.add(clock.now, endpoint, keys)
        elif op < 0.65:
            pending.forget_endpoint(endpoint)
            ref.forget(endpoint)
        assert pending.match(chain) == ref.match(clock.now, chain)
        assert len(pending) == ref.live(clock.now)
        bits = {e: pending._bits[e] for e in endpoints if e in pending._bits}
        masks = dict(pending.live_masks())
        for key, per in ref.until.items():
            want = sum(bits[e] for e, t in per.items() if t > clock.now)
            assert masks.pop(key, 0) == want
        assert not masks


@pytest.mark.parametrize("seed", range(6))
def test_spans_over_the_index_equal_a_brute_force_walk(
    seed: int, clock: Clock, implementation: str
) -> None:
    """The scheduler's walk (index masks + claims, as spans or worked out during the walk)
    against the definition: an endpoint holds a leading block if the index or one of its live
    claims has it, stopping at its first miss; the index has holes (removed middle blocks),
    claims overlap and diverge. Compiled and in Python (``implementation``)."""
    import random

    from pd_runtime.kv_events.events import BlockRemoved, BlockStored, encode_token_ids

    rng = random.Random(seed)
    index = PrefixIndex()
    pending = PendingPrefixes(ttl_s=3.0, clock=clock, bit_of=index.endpoint_bit)
    endpoints = [f"10.0.1.{i}:8000" for i in range(7)]
    prompts = [[rng.randrange(40) for _ in range(10 * BS)]]
    for _ in range(6):
        base = rng.choice(prompts)
        prompts.append(
            base[: rng.randrange(len(base))] + [rng.randrange(40) for _ in range(6 * BS)]
        )
    chains = [PrefixIndex.block_keys(p, BS) for p in prompts]
    for _ in range(250):
        clock.now += rng.choice((0.0, 0.2, 1.0))
        e = rng.choice(endpoints)
        pick = rng.randrange(len(prompts))
        tokens, chain = prompts[pick], chains[pick]
        op = rng.random()
        hashes = [f"{e}/{k}".encode() for k in chain]
        if op < 0.3:
            n = rng.randint(1, len(chain))
            index.apply(e, BlockStored(hashes[:n], None, encode_token_ids(tokens[: n * BS]), BS))
        elif op < 0.4:
            index.apply(e, BlockRemoved([rng.choice(hashes)]))
        elif op < 0.8:
            lo = rng.randrange(len(chain))
            pending.add(e, chain[lo : rng.randint(lo + 1, len(chain))])
        query = rng.choice(chains)
        claimed = pending.live_masks()
        want: dict[str, int] = {}
        for endpoint in endpoints:
            if endpoint not in index.endpoints() and endpoint not in pending._bits:
                continue
            bit = index.endpoint_bit(endpoint)
            n = 0
            for key in query:
                if not (index._any.get(key, 0) | claimed.get(key, 0)) & bit:
                    break
                n += 1
            if n:
                want[endpoint] = n
        assert index.match(query, spans=pending.spans(query)) == want
        assert index.match(query, claims=pending.live_heads()) == want
        assert index.match(query, overlay=claimed) == want
