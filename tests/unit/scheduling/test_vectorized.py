"""The vectorized decision path gives what the per-endpoint (reference) path gives.

Randomized: endpoint states (None, zero, negative, saturated signals, unhealthy endpoints),
cached prefixes, sessions, several profiles; two copies of each profile (their scorers carry
state: cold-spreader homes, session affinity) run the same sequence of decisions, one on arrays
and one through ``run_reference``, and must agree on the pick, every score bit for bit, the
breakdown, what was filtered out, the random draws, and when no endpoint is left. Also: the
C-level prefix walk and the pending overlay against their previous Python implementations.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest

from pd_runtime.errors import NoEndpointError
from pd_runtime.kv_events.index import PrefixIndex, leading_blocks
from pd_runtime.scheduling.kv_aware import DEFAULT_PROFILES, _breakdown
from pd_runtime.scheduling.pending import PendingPrefixes
from pd_runtime.scheduling.plugins import EndpointState, RequestContext
from pd_runtime.scheduling.profile import ProfileConfig, SchedulingProfile

from .common import context, state

PROFILES = {
    "default-decode": DEFAULT_PROFILES["decode"],
    "default-prefill": DEFAULT_PROFILES["prefill"],
    "limits-off": ProfileConfig.model_validate(
        {
            "filters": [
                {"type": "not-saturated", "max_in_flight": None, "max_waiting": 1},
                {"type": "healthy"},
            ],
            "scorers": [
                {"type": "in-flight-load", "token_share": 0.0, "weight": 2},
                {"type": "cold-spreader", "half_life_requests": 2},
                {"type": "prefix-cache", "weight": 0.5},
            ],
        }
    ),
    "random-picker": ProfileConfig.model_validate(
        {
            "filters": [{"type": "not-saturated", "max_kv_usage": None}],
            "scorers": [{"type": "queue-depth"}, {"type": "kv-cache-utilization"}],
            "picker": {"type": "random"},
        }
    ),
    "tolerant-ties": ProfileConfig.model_validate(
        {
            "scorers": [{"type": "session-affinity"}, {"type": "in-flight-load"}],
            "picker": {"type": "max-score", "tolerance": 0.3},
        }
    ),
}


def random_states(rng: random.Random, n: int) -> list[EndpointState]:
    signal = (None, 0, 0.0, -0.5, 0.3, 0.95, 1.0, 1.7, 2, 3.0, 5.0, 7)
    return [
        state(
            f"10.9.{i // 250}.{i % 250 + 1}:8200",
            in_flight_requests=rng.choice((0, 0, 1, 2, 3, 7, 8, 9, 12)),
            in_flight_tokens=rng.choice((0, rng.randint(0, 50_000))),
            waiting=rng.choice(signal),
            kv_usage=rng.choice(signal),
            healthy=rng.random() > 0.1,
        )
        for i in range(n)
    ]


def random_context(rng: random.Random, states: list[EndpointState], seed: int) -> RequestContext:
    blocks = rng.choice((0, 1, 5, 40))
    tokens = [rng.randrange(1000) for _ in range(blocks * 4 + rng.randint(0, 3))]
    cached = {}
    if blocks and rng.random() < 0.7:
        for s in rng.sample(states, rng.randint(0, len(states))):
            cached[s.address] = rng.choice((0, rng.randint(1, blocks), blocks))
    cached["10.99.0.1:8100"] = 3  # an endpoint that is not a candidate
    session = rng.choice((None, "s1", "s2", "s3"))
    return context(tokens, cached=cached, session=session, seed=seed)


def outcome(profile: SchedulingProfile, ctx: RequestContext, states: list[EndpointState]) -> tuple:
    run = profile.run_reference if profile is REFERENCE[0] else profile.run
    try:
        result = run(ctx, states)
    except NoEndpointError as exc:
        return ("no endpoint", str(exc), ctx.rng.random())
    return (
        result.picked.address,
        result.totals,
        result.scores,
        result.filtered_out,
        _breakdown((result,), 3),
        _breakdown((result,), None),
        ctx.rng.random(),  # the same draws were made
    )


REFERENCE: list[SchedulingProfile | None] = [None]


def hexes(outcome: tuple) -> list[str]:
    if outcome[0] == "no endpoint":
        return []
    totals, scores = outcome[1], outcome[2]
    values = list(totals.values()) + [v for s in scores.values() for v in s.values()]
    return [float(v).hex() for v in values]


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("seed", range(4))
def test_vectorized_profile_matches_reference(name: str, seed: int) -> None:
    rng = random.Random(f"{name}-{seed}")
    fast = SchedulingProfile("decode", PROFILES[name])
    slow = SchedulingProfile("decode", PROFILES[name])
    assert fast.vectorized
    REFERENCE[0] = slow
    n = rng.choice((12, 13, 40, 64, 97))
    states = random_states(rng, n)
    for i in range(60):
        if i % 7 == 0:  # a scrape round changes some signals
            for s, fresh in zip(states, random_states(rng, n), strict=True):
                if rng.random() < 0.3:
                    s.waiting, s.kv_usage, s.healthy = fresh.waiting, fresh.kv_usage, fresh.healthy
        ctx_seed = rng.randrange(1 << 30)
        ctx = random_context(rng, states, ctx_seed)
        twin = RequestContext(**{**vars(ctx), "rng": random.Random(ctx_seed)})
        candidates = states if rng.random() < 0.8 else rng.sample(states, rng.randint(1, n))
        got, want = outcome(fast, ctx, candidates), outcome(slow, twin, candidates)
        assert got == want, f"decision {i}"
        assert hexes(got) == hexes(want)  # bit for bit, -0.0 included
        # book a little load on the pick, as the scheduler does
        if got[0] != "no endpoint":
            picked = next(s for s in states if s.address == got[0])
            picked.in_flight_requests += 1
            picked.in_flight_tokens += rng.randint(0, 3000)
            if rng.random() < 0.5:
                victim = rng.choice(states)
                victim.in_flight_requests = max(0, victim.in_flight_requests - 1)


def test_nan_signals_fall_back_to_the_reference_path() -> None:
    states = random_states(random.Random(1), 20)
    states[3].waiting = float("nan")
    fast = SchedulingProfile("decode", DEFAULT_PROFILES["decode"])
    slow = SchedulingProfile("decode", DEFAULT_PROFILES["decode"])
    REFERENCE[0] = slow
    ctx, twin = context([1] * 40, seed=5), context([1] * 40, seed=5)
    assert outcome(fast, ctx, states)[:4] == outcome(slow, twin, states)[:4]


def test_a_profile_with_a_per_endpoint_plugin_is_not_vectorized() -> None:
    config = ProfileConfig.model_validate({"scorers": [{"type": "predicted-latency"}]})
    assert not SchedulingProfile("decode", config).vectorized
    assert SchedulingProfile("decode", DEFAULT_PROFILES["decode"]).vectorized


def _leading_blocks_reference(
    keys: Sequence[int],
    masks: Mapping[int, int],
    endpoint_of_bit: Mapping[int, str],
    overlay: Mapping[int, int] | None = None,
) -> dict[str, int]:
    """The walk as it was written before (one Python iteration per block)."""
    extra = overlay or {}
    result: dict[str, int] = {}
    alive = 0
    i = 0
    for i, key in enumerate(keys):
        here = masks.get(key, 0) | extra.get(key, 0) if extra else masks.get(key, 0)
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


@pytest.mark.parametrize("seed", range(20))
def test_leading_blocks_matches_the_python_walk(seed: int) -> None:
    rng = random.Random(seed)
    endpoints = rng.choice((1, 3, 8, 70))
    of_bit = {1 << i: f"e{i}" for i in range(endpoints)}
    full = (1 << endpoints) - 1
    for _ in range(50):
        keys = [rng.randrange(60) for _ in range(rng.randint(0, 40))]
        masks = {k: rng.choice((full, full, rng.randrange(full + 1))) for k in range(50)}
        overlay = rng.choice((None, {}, {k: rng.randrange(full + 1) for k in range(40, 60)}))
        got = leading_blocks(keys, masks, of_bit, overlay)
        want = _leading_blocks_reference(keys, masks, of_bit, overlay)
        assert got == want and list(got) == list(want)


class _PendingReference:
    """The pending overlay as it was written before (a dict per key)."""

    def __init__(self, ttl_s: float, clock: object) -> None:
        self.ttl_s, self.clock = ttl_s, clock
        self.holders: dict[int, dict[str, float]] = {}
        self.expiries: list[tuple[float, str, list[int]]] = []

    def add(self, endpoint: str, keys: list[int]) -> None:
        if not keys or self.ttl_s <= 0:
            return
        now = self.clock()  # type: ignore[operator]
        self.expire(now)
        for key in keys:
            self.holders.setdefault(key, {})[endpoint] = now + self.ttl_s
        self.expiries.append((now + self.ttl_s, endpoint, keys))

    def expire(self, now: float) -> None:
        while self.expiries and self.expiries[0][0] <= now:
            expiry, endpoint, keys = self.expiries.pop(0)
            for key in keys:
                per = self.holders.get(key)
                if per is not None and per.get(endpoint) == expiry:
                    del per[endpoint]
                    if not per:
                        del self.holders[key]

    def forget(self, endpoint: str) -> None:
        for key in [k for k, per in self.holders.items() if endpoint in per]:
            del self.holders[key][endpoint]
            if not self.holders[key]:
                del self.holders[key]

    def match(self, keys: list[int]) -> dict[str, int]:
        self.expire(self.clock())  # type: ignore[operator]
        result: dict[str, int] = {}
        for endpoint in {e for per in self.holders.values() for e in per}:
            n = 0
            while n < len(keys) and endpoint in self.holders.get(keys[n], {}):
                n += 1
            if n:
                result[endpoint] = n
        return result


@pytest.mark.parametrize("seed", range(10))
def test_pending_overlay_matches_the_per_key_version(seed: int) -> None:
    rng = random.Random(seed)
    now = [0.0]
    fast = PendingPrefixes(3.0, clock=lambda: now[0], bit_of=PrefixIndex().endpoint_bit)
    slow = _PendingReference(3.0, lambda: now[0])
    endpoints = ["a", "b", "c", "d"]
    for _ in range(300):
        now[0] += rng.choice((0.0, 0.1, 0.5, 1.0))
        op = rng.random()
        if op < 0.6:
            endpoint = rng.choice(endpoints)
            start = rng.randrange(30)
            keys = list(range(start, start + rng.randint(0, 12)))
            if rng.random() < 0.1:
                keys += keys[:2]  # a repeated key
            fast.add(endpoint, keys)
            slow.add(endpoint, keys)
        elif op < 0.65:
            endpoint = rng.choice(endpoints)
            fast.forget_endpoint(endpoint)
            slow.forget(endpoint)
        else:
            start = rng.randrange(30)
            keys = list(range(start, start + rng.randint(1, 12)))
            assert fast.match(keys) == slow.match(keys)
        slow.expire(now[0])
        fast.live_masks()
        assert fast._holders == slow.holders
        assert len(fast) == len(slow.holders)
