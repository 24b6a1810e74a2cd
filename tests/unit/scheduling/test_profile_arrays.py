"""The profile scores on arrays: the same choice and the same scores as a straightforward reference
(one Python expression per endpoint per scorer, summed per endpoint) on random states.

The reference below is written from the scorers' documented rules, not from their code, and
reads the stateful scorers' memory (sessions, cold homes) before each decision, so a decision
sequence also checks that ``picked`` updates that memory alike.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from pd_runtime.scheduling.kv_aware import DEFAULT_PROFILES, _breakdown
from pd_runtime.scheduling.plugins import (
    SCORERS,
    EndpointState,
    RequestContext,
    Scorer,
    load_builtin_plugins,
    register,
)
from pd_runtime.scheduling.profile import ProfileConfig, SchedulingProfile
from pd_runtime.scheduling.scorers.cold_spreader import ColdSpreaderScorer
from pd_runtime.scheduling.scorers.session_affinity import SessionAffinityScorer

from .common import context, state

TOLERANCE = 1e-9  # the max-score picker's


def _min_max_inverse(values: dict[str, float]) -> dict[str, float]:
    low, high = min(values.values()), max(values.values())
    return {a: 1.0 if high <= low else (high - v) / (high - low) for a, v in values.items()}


def reference(
    ctx: RequestContext, candidates: list[EndpointState], profile: SchedulingProfile
) -> tuple[str, dict[str, dict[str, float]], dict[str, float]]:
    """The decode profile's decision, per endpoint: (picked address, scores, totals)."""
    ok = [e for e in candidates if e.healthy]
    kept = [
        e
        for e in ok
        if not (e.in_flight_requests >= 8 or (e.waiting or 0) > 4 or (e.kv_usage or 0) > 0.9)
    ]
    survivors = kept or ok  # not-saturated fails open
    cached, blocks = ctx.cached_blocks, len(ctx.block_keys)
    session = next(s for s, _ in profile.scorers if isinstance(s, SessionAffinityScorer))
    cold = next(s for s, _ in profile.scorers if isinstance(s, ColdSpreaderScorer))
    last = session._where.get(ctx.session) if ctx.session else None
    is_cold = all(cached.get(e.address, 0) == 0 for e in survivors)

    def in_flight(e: EndpointState) -> float:
        reqs = [x.in_flight_requests for x in survivors]
        toks = [x.in_flight_tokens for x in survivors]
        r_span, t_span = max(reqs) - min(reqs), max(toks) - min(toks)
        r = (max(reqs) - e.in_flight_requests) / r_span if r_span else 1.0
        t = (max(toks) - e.in_flight_tokens) / t_span if t_span else 1.0
        return 0.5 * r + 0.5 * t

    def kv(e: EndpointState) -> float:
        u = e.kv_usage
        return 1.0 if not u or u < 0 else 0.0 if u >= 1 else 1.0 - u

    scores = {
        "prefix-cache": {
            e.address: cached.get(e.address, 0) / blocks if blocks else 0.0 for e in survivors
        },
        "in-flight-load": {e.address: in_flight(e) for e in survivors},
        "queue-depth": _min_max_inverse({e.address: e.waiting or 0.0 for e in survivors}),
        "kv-cache-utilization": {e.address: kv(e) for e in survivors},
        "session-affinity": {e.address: float(e.address == last) for e in survivors},
        "cold-spreader": (
            _min_max_inverse({e.address: cold._homes.get(e.address, 0.0) for e in survivors})
            if is_cold
            else {e.address: 1.0 for e in survivors}
        ),
    }
    weights = {"prefix-cache": 3.0}
    total_weight = sum(weights.get(name, 1.0) for name in scores)
    totals = {
        e.address: sum(weights.get(n, 1.0) / total_weight * s[e.address] for n, s in scores.items())
        for e in survivors
    }
    best = max(totals.values())
    top = [e for e in survivors if totals[e.address] >= best - TOLERANCE]
    rng = random.Random()
    rng.setstate(ctx.rng.getstate())  # the picker draws from the context's generator
    picked = top[0] if len(top) == 1 else rng.choice(top)
    return picked.address, scores, totals


def random_states(rng: random.Random, n: int) -> list[EndpointState]:
    out = []
    for i in range(n):
        out.append(
            state(
                f"10.0.{i // 250}.{i % 250 + 1}:8200",
                in_flight_requests=rng.choice((0, 0, 1, 2, 3, 7, 8, 9)),
                in_flight_tokens=rng.choice((0, 100, 100, 2048, rng.randrange(10**6))),
                waiting=rng.choice((None, 0.0, 1.0, 2.0, 5.0)),
                kv_usage=rng.choice((None, -0.1, 0.0, 0.3, rng.random(), 0.95, 1.2)),
                healthy=rng.random() > 0.1,
            )
        )
    return out


def mutate(rng: random.Random, states: list[EndpointState]) -> None:
    """What happens between decisions: loads move, a scrape lands, an endpoint flips health."""
    for s in rng.sample(states, min(len(states), rng.randint(0, 3))):
        s.in_flight_requests = max(0, s.in_flight_requests + rng.choice((-1, 1, 1)))
        s.in_flight_tokens = max(0, s.in_flight_tokens + rng.choice((-500, 700, 3000)))
    if rng.random() < 0.2:
        for s in states:
            s.waiting = rng.choice((None, 0.0, 1.0, 6.0))
            s.kv_usage = rng.choice((None, 0.2, rng.random(), 0.95))
    if rng.random() < 0.1:
        s = rng.choice(states)
        s.healthy = not s.healthy


@pytest.mark.parametrize("seed", range(12))
def test_decode_profile_matches_per_endpoint_reference(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice((1, 2, 3, 5, 16, 64, 80))
    states = random_states(rng, n)
    if not any(s.healthy for s in states):
        states[0].healthy = True
    profile = SchedulingProfile("decode", DEFAULT_PROFILES["decode"])
    prompt = [rng.randrange(1000) for _ in range(rng.choice((2, 40, 400)))]
    sessions = ["s1", "s2", "s3", None]
    for step in range(60):
        mutate(rng, states)
        if not any(s.healthy for s in states):
            states[rng.randrange(n)].healthy = True
        blocks = len(prompt) // 4
        cached = {
            s.address: rng.randint(0 if rng.random() < 0.2 else 1, max(1, blocks))
            for s in rng.sample(states, rng.randint(0, min(n, 6)))
        }
        if rng.random() < 0.4:
            cached = {}  # a cold request: the spreader decides
        ctx = context(prompt, cached=cached, session=rng.choice(sessions), seed=seed * 1000 + step)
        want_picked, want_scores, want_totals = reference(ctx, states, profile)
        run = profile.run(ctx, states)
        assert run.picked.address == want_picked, step
        assert run.totals == pytest.approx(want_totals, rel=1e-12, abs=1e-12)
        assert run.scores.keys() == want_scores.keys()
        for name, values in want_scores.items():
            assert run.scores[name] == pytest.approx(values, rel=1e-12, abs=1e-12), name
        assert all(type(v) is float for v in run.totals.values())
        healthy = {s.address for s in states if s.healthy}
        assert set(run.filtered_out) == {s.address for s in states} - set(run.totals)
        assert set(run.totals) <= healthy


def _breakdown_reference(run: Any, top_k: int) -> dict[str, dict[str, float]]:
    keep = sorted(run.totals, key=run.totals.__getitem__, reverse=True)[:top_k]
    if run.picked.address not in keep:
        keep.append(run.picked.address)
    out = {name: {a: values[a] for a in keep} for name, values in run.scores.items()}
    out["total"] = {a: run.totals[a] for a in keep}
    return out


@pytest.mark.parametrize("top_k", [0, 1, 4, 100])
def test_breakdown_top_k_is_the_best_totals_and_the_picked(top_k: int) -> None:
    rng = random.Random(top_k)
    states = random_states(rng, 64)
    for s in states:
        s.healthy = True
    profile = SchedulingProfile("decode", DEFAULT_PROFILES["decode"])
    for step in range(30):
        mutate(rng, states)
        for s in states:
            s.healthy = True
        cached = {s.address: rng.choice((1, 1, 2, 3)) for s in rng.sample(states, 5)}
        run = profile.run(context(list(range(40)), cached=cached, seed=step), states)
        got = _breakdown([run], top_k)
        if top_k == 0:
            assert got == {}
            continue
        want = (
            _breakdown_reference(run, top_k)
            if top_k < len(run.totals)
            else {
                **run.scores,
                "total": run.totals,
            }
        )
        assert got == want
        assert all(list(row) == list(want[name]) for name, row in got.items())  # same order


def test_dict_only_scorer_goes_through_the_conversion() -> None:
    @register(SCORERS, "test-dict-only")
    class DictOnly(Scorer):
        def score(
            self, ctx: RequestContext, endpoints: Sequence[EndpointState]
        ) -> dict[str, float]:
            return {e.address: 1.0 / (1 + e.in_flight_requests) for e in endpoints[1:]}

    try:
        config = ProfileConfig.model_validate({"scorers": [{"type": "test-dict-only"}]})
        profile = SchedulingProfile("decode", config)
        states = [state(f"10.0.0.{i}:8200", in_flight_requests=i) for i in range(1, 5)]
        run = profile.run(context([1, 2, 3, 4]), states)
        # the first endpoint got no score from the dict: it adds 0, as the dict path did
        assert run.totals == pytest.approx(
            {
                "10.0.0.1:8200": 0.0,
                "10.0.0.2:8200": 1 / 3,
                "10.0.0.3:8200": 1 / 4,
                "10.0.0.4:8200": 1 / 5,
            }
        )
        assert run.picked.address == "10.0.0.2:8200"
    finally:
        SCORERS._entries.pop("test-dict-only", None)


def test_builtin_scorers_keep_the_dict_method() -> None:
    states = [state("10.0.0.1:8200", waiting=2.0), state("10.0.0.2:8200", waiting=0.0)]
    load_builtin_plugins()
    for name in SCORERS.names():
        scorer = SCORERS.create(name)
        ctx = context([1, 2, 3, 4, 5, 6, 7, 8], cached={"10.0.0.1:8200": 1})
        as_dict = scorer.score(ctx, states)
        as_array = scorer.score_array(ctx, states)
        assert list(as_dict) == ["10.0.0.1:8200", "10.0.0.2:8200"], name
        assert np.array_equal(np.array(list(as_dict.values())), as_array), name


def test_a_scorer_must_implement_one_method() -> None:
    with pytest.raises(TypeError, match="implements score or score_array"):

        class Neither(Scorer):
            pass
