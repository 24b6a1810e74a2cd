"""Filters (healthy, not-saturated) and pickers (max-score with random tie-break, random)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from pd_runtime.scheduling.filters.healthy import HealthyFilter
from pd_runtime.scheduling.filters.not_saturated import NotSaturatedFilter
from pd_runtime.scheduling.pickers.max_score import MaxScorePicker
from pd_runtime.scheduling.pickers.random import RandomPicker
from pd_runtime.scheduling.plugins import EndpointState
from pd_runtime.scheduling.profile import ProfileConfig, SchedulingProfile

from .common import A, B, C, context, state

PROMPT = list(range(100, 116))


def addresses(endpoints: list[EndpointState]) -> list[str]:
    return [e.address for e in endpoints]


# ---- healthy ------------------------------------------------------------------------------


def test_healthy_filter_drops_unhealthy_endpoints_and_does_not_fail_open() -> None:
    endpoints = [state(A), state(B, healthy=False), state(C)]
    assert addresses(HealthyFilter().filter(context(PROMPT), endpoints)) == [A, C]
    assert HealthyFilter().filter(context(PROMPT), [state(A, healthy=False)]) == []
    assert HealthyFilter.fail_open is False


# ---- not-saturated ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "saturated"),
    [
        ({}, False),
        ({"in_flight_requests": 7}, False),
        ({"in_flight_requests": 8}, True),  # max_in_flight is a cap: 8 in flight is full
        ({"waiting": 4.0}, False),
        ({"waiting": 5.0}, True),  # more than max_waiting
        ({"kv_usage": 0.9}, False),
        ({"kv_usage": 0.91}, True),  # more than max_kv_usage
        ({"waiting": None, "kv_usage": None}, False),  # unscraped
    ],
)
def test_not_saturated_thresholds(fields: dict[str, object], saturated: bool) -> None:
    f = NotSaturatedFilter()
    assert f.saturated(state(A, **fields)) is saturated
    assert addresses(f.filter(context(PROMPT), [state(A, **fields)])) == ([] if saturated else [A])


def test_not_saturated_limits_can_be_set_and_disabled() -> None:
    busy = state(A, in_flight_requests=100, waiting=100.0, kv_usage=1.0)
    assert (
        NotSaturatedFilter(max_in_flight=None, max_waiting=None, max_kv_usage=None).saturated(busy)
        is False
    )
    assert NotSaturatedFilter(max_in_flight=2).saturated(state(A, in_flight_requests=2))
    assert not NotSaturatedFilter(max_in_flight=3).saturated(state(A, in_flight_requests=2))
    assert NotSaturatedFilter(max_waiting=0).saturated(state(A, waiting=1.0))
    assert NotSaturatedFilter(max_in_flight=2).describe() == {
        "type": "not-saturated",
        "max_in_flight": 2,
        "max_waiting": 4,
        "max_kv_usage": 0.9,
    }


def test_not_saturated_keeps_the_unsaturated_and_is_fail_open() -> None:
    f = NotSaturatedFilter(max_in_flight=1)
    endpoints = [state(A, in_flight_requests=1), state(B), state(C, waiting=9.0)]
    assert addresses(f.filter(context(PROMPT), endpoints)) == [B]
    assert NotSaturatedFilter.fail_open is True


def test_all_saturated_fails_open_in_a_profile() -> None:
    profile = SchedulingProfile(
        "decode",
        ProfileConfig.model_validate(
            {"filters": [{"type": "not-saturated", "max_in_flight": 1}], "scorers": []}
        ),
    )
    endpoints = [state(A, in_flight_requests=3), state(B, in_flight_requests=1)]
    result = profile.run(context(PROMPT), endpoints)
    assert result.picked.address in {A, B}
    assert set(result.totals) == {A, B}  # both stayed candidates
    assert result.filtered_out == ()


def test_fail_open_restores_only_what_earlier_filters_kept() -> None:
    # A is unhealthy, B (the only healthy one) is saturated: not-saturated fails open to [B],
    # never back to the unhealthy A.
    profile = SchedulingProfile(
        "decode",
        ProfileConfig.model_validate(
            {"filters": [{"type": "healthy"}, {"type": "not-saturated"}], "scorers": []}
        ),
    )
    endpoints = [state(A, healthy=False), state(B, in_flight_requests=50)]
    for seed in range(20):
        result = profile.run(context(PROMPT, seed=seed), endpoints)
        assert result.picked.address == B
        assert result.filtered_out == (A,)


# ---- max-score ----------------------------------------------------------------------------


def test_max_score_always_picks_a_clear_winner() -> None:
    picker = MaxScorePicker()
    endpoints = [state(A), state(B), state(C)]
    ctx = context(PROMPT, seed=7)
    totals = {A: 0.5, B: 0.75, C: 0.74}
    assert {picker.pick(ctx, endpoints, totals).address for _ in range(200)} == {B}


def test_max_score_breaks_ties_at_random_between_the_tied_only() -> None:
    picker = MaxScorePicker()
    endpoints = [state(A), state(B), state(C)]
    ctx = context(PROMPT, seed=1)
    totals = {A: 0.8, B: 0.2, C: 0.8}
    counts = Counter(picker.pick(ctx, endpoints, totals).address for _ in range(400))
    assert set(counts) == {A, C}
    assert 120 < counts[A] < 280  # roughly even, not "first in the list"


def test_max_score_tie_break_is_reproducible_from_the_seed() -> None:
    picker = MaxScorePicker()
    endpoints = [state(A), state(B)]
    totals = {A: 1.0, B: 1.0}

    def run(seed: int) -> list[str]:
        ctx = context(PROMPT, seed=seed)
        return [picker.pick(ctx, endpoints, totals).address for _ in range(50)]

    assert run(3) == run(3)
    assert len(set(run(3))) == 2


def test_max_score_tolerance_decides_what_counts_as_a_tie() -> None:
    endpoints = [state(A), state(B)]
    totals = {A: 0.5, B: 0.5 + 1e-12}  # float noise: a tie
    ctx = context(PROMPT, seed=0)
    assert {MaxScorePicker().pick(ctx, endpoints, totals).address for _ in range(100)} == {A, B}
    wide = MaxScorePicker(tolerance=0.1)
    assert {wide.pick(ctx, endpoints, {A: 0.5, B: 0.55}).address for _ in range(100)} == {A, B}
    exact = MaxScorePicker(tolerance=0.0)
    assert {exact.pick(ctx, endpoints, totals).address for _ in range(100)} == {B}


# ---- random -------------------------------------------------------------------------------


def test_random_picker_ignores_scores_and_picks_only_candidates() -> None:
    endpoints = [state(A), state(B), state(C)]
    ctx = context(PROMPT)
    ctx.rng = random.Random(5)
    totals = {A: 1.0, B: 0.0, C: 0.0}
    counts = Counter(RandomPicker().pick(ctx, endpoints, totals).address for _ in range(300))
    assert set(counts) == {A, B, C}
    assert min(counts.values()) > 50
    only = [state(B)]
    assert {RandomPicker().pick(ctx, only, {B: 0.0}).address for _ in range(20)} == {B}


def test_max_score_prefix_tie_break_is_the_same_in_every_process_and_spreads_prompts() -> None:
    from pd_runtime.scheduling.pickers.max_score import rendezvous_rank

    endpoints = [state(A), state(B), state(C)]
    totals = {A: 1.0, B: 1.0, C: 0.2}
    picker = MaxScorePicker(tie_break="prefix")
    picks = {}
    for first in range(200):
        ctx = context(PROMPT, seed=first)  # another seed: the rng must not matter
        ctx.block_keys = [first, 7, 8]
        picked = picker.pick(ctx, endpoints, totals).address
        again = MaxScorePicker(tie_break="prefix").pick(ctx, endpoints[::-1], totals).address
        assert picked == again  # neither the instance nor the order of endpoints decides
        picks[first] = picked
    counts = Counter(picks.values())
    assert set(counts) == {A, B} and 70 < counts[A] < 130  # spread across prompts, never C
    # Stable across processes (replicas): not Python's str hash, which each process salts.
    code = f"from pd_runtime.scheduling.pickers.max_score import rendezvous_rank as r; print(r(1, {A!r}).hex())"
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert other.stdout.strip() == rendezvous_rank(1, A).hex()


def test_max_score_rejects_an_unknown_tie_break() -> None:
    with pytest.raises(ValueError, match="tie_break"):
        MaxScorePicker(tie_break="first")  # type: ignore[arg-type]
