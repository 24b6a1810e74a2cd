"""Every scorer: what it rates higher, its edge cases, and the state the stateful ones keep."""

from __future__ import annotations

import pytest

from pd_runtime.scheduling.plugins import (
    FILTERS,
    PICKERS,
    SCORERS,
    load_builtin_plugins,
    min_max_inverse,
)
from pd_runtime.scheduling.scorers.cold_spreader import ColdSpreaderScorer
from pd_runtime.scheduling.scorers.in_flight_load import InFlightLoadScorer
from pd_runtime.scheduling.scorers.kv_cache_utilization import KVCacheUtilizationScorer
from pd_runtime.scheduling.scorers.prefix_cache import PrefixCacheScorer
from pd_runtime.scheduling.scorers.queue_depth import QueueDepthScorer
from pd_runtime.scheduling.scorers.session_affinity import SessionAffinityScorer

from .common import A, B, C, context, state

PROMPT = list(range(100, 116))  # 4 full blocks of 4


def test_builtin_plugins_are_registered_under_their_yaml_names() -> None:
    load_builtin_plugins()
    assert {
        "prefix-cache",
        "queue-depth",
        "kv-cache-utilization",
        "in-flight-load",
        "session-affinity",
        "cold-spreader",
    } <= set(SCORERS.names())
    assert {"healthy", "not-saturated"} <= set(FILTERS.names())
    assert {"max-score", "random"} <= set(PICKERS.names())
    assert SCORERS.factory("prefix-cache") is PrefixCacheScorer
    assert PrefixCacheScorer.name == "prefix-cache"


def test_unknown_plugin_parameter_is_a_type_error_naming_the_plugin() -> None:
    with pytest.raises(TypeError, match=r"queue-depth: unknown parameters \['wieght'\]"):
        QueueDepthScorer(wieght=1)


def test_min_max_inverse() -> None:
    assert min_max_inverse({}) == {}
    assert min_max_inverse({A: 3.0, B: 3.0}) == {A: 1.0, B: 1.0}
    assert min_max_inverse({A: 0.0, B: 5.0, C: 10.0}) == {A: 1.0, B: 0.5, C: 0.0}


# ---- prefix-cache -------------------------------------------------------------------------


def test_prefix_cache_scores_the_share_of_leading_blocks_held() -> None:
    ctx = context(PROMPT, cached={A: 2, B: 4})
    scores = PrefixCacheScorer().score(ctx, [state(A), state(B), state(C)])
    assert scores == {A: 0.5, B: 1.0, C: 0.0}


def test_prefix_cache_without_full_blocks_scores_zero_everywhere() -> None:
    # Shorter than one block, or not tokenized: no keys, nothing to match (a stale cached map
    # must not produce a division by zero or a score).
    for ctx in (context([1, 2, 3], cached={A: 1}), context(None, cached={A: 1})):
        assert ctx.block_keys == []
        assert PrefixCacheScorer().score(ctx, [state(A), state(B)]) == {A: 0.0, B: 0.0}


# ---- queue-depth --------------------------------------------------------------------------


def test_queue_depth_prefers_shorter_queues_min_max_normalised() -> None:
    endpoints = [state(A, waiting=0.0), state(B, waiting=5.0), state(C, waiting=10.0)]
    assert QueueDepthScorer().score(context(PROMPT), endpoints) == {A: 1.0, B: 0.5, C: 0.0}


def test_queue_depth_counts_unscraped_endpoints_as_empty() -> None:
    endpoints = [state(A, waiting=None), state(B, waiting=2.0)]
    assert QueueDepthScorer().score(context(PROMPT), endpoints) == {A: 1.0, B: 0.0}
    equal = [state(A, waiting=None), state(B, waiting=0.0)]
    assert QueueDepthScorer().score(context(PROMPT), equal) == {A: 1.0, B: 1.0}


# ---- kv-cache-utilization -----------------------------------------------------------------


def test_kv_cache_utilization_is_absolute_free_share_clamped() -> None:
    endpoints = [
        state(A, kv_usage=0.25),
        state(B, kv_usage=None),  # unscraped: 1
        state(C, kv_usage=1.5),  # out of range: clamped
    ]
    scores = KVCacheUtilizationScorer().score(context(PROMPT), endpoints)
    assert scores == {A: 0.75, B: 1.0, C: 0.0}
    # Absolute, not min-max: two equally busy caches both score low.
    busy = [state(A, kv_usage=0.8), state(B, kv_usage=0.8)]
    assert KVCacheUtilizationScorer().score(context(PROMPT), busy) == pytest.approx(
        {A: 0.2, B: 0.2}
    )
    assert KVCacheUtilizationScorer().score(context(PROMPT), [state(A, kv_usage=-0.1)]) == {A: 1.0}


# ---- in-flight-load -----------------------------------------------------------------------


def test_in_flight_load_mixes_request_and_token_counts() -> None:
    endpoints = [
        state(A, in_flight_requests=0, in_flight_tokens=1000),
        state(B, in_flight_requests=4, in_flight_tokens=0),
        state(C, in_flight_requests=2, in_flight_tokens=500),
    ]
    ctx = context(PROMPT)
    assert InFlightLoadScorer(token_share=0.0).score(ctx, endpoints) == {A: 1.0, B: 0.0, C: 0.5}
    assert InFlightLoadScorer(token_share=1.0).score(ctx, endpoints) == {A: 0.0, B: 1.0, C: 0.5}
    assert InFlightLoadScorer().score(ctx, endpoints) == {A: 0.5, B: 0.5, C: 0.5}
    assert InFlightLoadScorer(token_share=0.25).score(ctx, endpoints) == {
        A: 0.75,
        B: 0.25,
        C: 0.5,
    }


def test_in_flight_load_idle_endpoints_all_score_one() -> None:
    assert InFlightLoadScorer().score(context(PROMPT), [state(A), state(B)]) == {A: 1.0, B: 1.0}


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_in_flight_load_rejects_token_share_outside_unit_interval(share: float) -> None:
    with pytest.raises(ValueError, match="token_share"):
        InFlightLoadScorer(token_share=share)


# ---- session-affinity ---------------------------------------------------------------------


def test_session_affinity_follows_the_session_to_where_it_last_went() -> None:
    scorer = SessionAffinityScorer()
    endpoints = [state(A), state(B)]
    s1 = context(PROMPT, session="s1")
    assert scorer.score(s1, endpoints) == {A: 0.0, B: 0.0}  # a new session
    scorer.picked(s1, endpoints[1])
    assert scorer.score(s1, endpoints) == {A: 0.0, B: 1.0}
    assert scorer.score(context(PROMPT, session="s2"), endpoints) == {A: 0.0, B: 0.0}
    assert scorer.score(context(PROMPT), endpoints) == {A: 0.0, B: 0.0}  # no header
    scorer.picked(s1, endpoints[0])  # the session moved
    assert scorer.score(s1, endpoints) == {A: 1.0, B: 0.0}
    # Its last endpoint is not a candidate (filtered out): no preference among the others.
    assert scorer.score(s1, [state(B), state(C)]) == {B: 0.0, C: 0.0}


def test_session_affinity_ignores_requests_without_a_session() -> None:
    scorer = SessionAffinityScorer()
    scorer.picked(context(PROMPT), state(A))
    assert scorer.describe()["sessions"] == 0


def test_session_affinity_forgets_least_recently_used_sessions() -> None:
    scorer = SessionAffinityScorer(max_sessions=2)
    a, b = state(A), state(B)
    s1, s2, s3 = (context(PROMPT, session=s) for s in ("s1", "s2", "s3"))
    scorer.picked(s1, a)
    scorer.picked(s2, b)
    scorer.picked(s1, a)  # s1 used again: s2 is now the oldest
    scorer.picked(s3, b)
    assert scorer.describe() == {"type": "session-affinity", "max_sessions": 2, "sessions": 2}
    assert scorer.score(s1, [a, b]) == {A: 1.0, B: 0.0}
    assert scorer.score(s2, [a, b]) == {A: 0.0, B: 0.0}  # forgotten
    assert scorer.score(s3, [a, b]) == {A: 0.0, B: 1.0}


# ---- cold-spreader ------------------------------------------------------------------------


def test_cold_spreader_sends_cold_prompts_where_fewest_went_lately() -> None:
    scorer = ColdSpreaderScorer()
    endpoints = [state(A), state(B)]
    cold = context(PROMPT)
    assert scorer.score(cold, endpoints) == {A: 1.0, B: 1.0}
    scorer.picked(cold, endpoints[0])
    assert scorer.score(cold, endpoints) == {A: 0.0, B: 1.0}
    scorer.picked(cold, endpoints[1])
    scorer.picked(cold, endpoints[1])
    scores = scorer.score(cold, endpoints)
    assert scores[A] == 1.0 and scores[B] == 0.0


def test_cold_spreader_stays_out_of_the_way_of_cached_prompts() -> None:
    scorer = ColdSpreaderScorer()
    endpoints = [state(A), state(B)]
    scorer.picked(context(PROMPT), endpoints[0])
    warm = context(PROMPT, cached={B: 1})  # a hit on a candidate
    assert scorer.score(warm, endpoints) == {A: 1.0, B: 1.0}
    scorer.picked(warm, endpoints[0])  # warm picks are not counted as new homes
    scorer.picked(context(None), endpoints[0])  # nor are untokenized ones (no prefix to home)
    assert scorer.score(context(PROMPT), endpoints) == {A: 0.0, B: 1.0}
    assert scorer._homes == {A: 1.0}


def test_cold_spreader_counts_decay_with_the_half_life() -> None:
    scorer = ColdSpreaderScorer(half_life_requests=1.0)
    cold = context(PROMPT)
    endpoints = [state(A), state(B), state(C)]
    scorer.picked(cold, endpoints[0])  # A: 1
    scorer.picked(cold, endpoints[1])  # A: 0.5, B: 1
    assert scorer._homes == {A: 0.5, B: 1.0}
    assert scorer.score(cold, endpoints) == {A: 0.5, B: 0.0, C: 1.0}
    assert scorer.describe() == {"type": "cold-spreader", "half_life_requests": 1.0}


@pytest.mark.parametrize("half_life", [0.0, -1.0])
def test_cold_spreader_rejects_non_positive_half_life(half_life: float) -> None:
    with pytest.raises(ValueError, match="half_life_requests"):
        ColdSpreaderScorer(half_life_requests=half_life)


def test_cold_spreader_judges_cold_among_its_own_candidates() -> None:
    """A prompt held only by a prefill worker is still cold when choosing a decode worker."""
    scorer = ColdSpreaderScorer()
    endpoints = [state(A), state(B)]
    on_prefill_only = context(PROMPT, cached={"127.0.0.1:8100": 3})
    scorer.picked(context(PROMPT), endpoints[0])  # A is some cold prompt's home
    assert scorer.score(on_prefill_only, endpoints) == {A: 0.0, B: 1.0}
    scorer.picked(on_prefill_only, endpoints[1])  # counted as a cold placement on B
    assert scorer.score(context(PROMPT), endpoints)[B] < 1.0


# ---- memoized scrape-only scorers -----------------------------------------------------------


def test_scrape_only_scorers_follow_every_change_of_signal_or_candidates() -> None:
    """queue-depth and kv-cache-utilization reuse their last answer while the candidates and
    the scraped signal are the same; any change (a scrape, a direct assignment, another
    candidate list) is seen at once, and callers never share the cached dict."""
    a, b, c = state(A, waiting=1.0, kv_usage=0.5), state(B, waiting=3.0), state(C, waiting=None)
    queue, usage = QueueDepthScorer(), KVCacheUtilizationScorer()
    ctx = context(PROMPT)
    first = queue.score(ctx, [a, b, c])
    assert first == {A: 2 / 3, B: 0.0, C: 1.0}
    first[A] = 42.0  # the caller's copy
    assert queue.score(ctx, [a, b, c]) == {A: 2 / 3, B: 0.0, C: 1.0}
    b.waiting = 0.0
    assert queue.score(ctx, [a, b, c]) == {A: 0.0, B: 1.0, C: 1.0}
    assert queue.score(ctx, [a, c]) == {A: 0.0, C: 1.0}
    assert usage.score(ctx, [a, b]) == {A: 0.5, B: 1.0}
    b.kv_usage = 0.25
    assert usage.score(ctx, [a, b]) == {A: 0.5, B: 0.75}
    assert usage.score(ctx, [b, a]) == {B: 0.75, A: 0.5}
