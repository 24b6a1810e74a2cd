"""The latency model (learns a known slope, follows a slowdown, cold start), the
predicted-latency scorer and the slo filter."""

from __future__ import annotations

import pytest

from pd_runtime.scheduling.filters.slo import SLOFilter
from pd_runtime.scheduling.latency import EWLine, LatencyModel, TransferEstimator
from pd_runtime.scheduling.plugins import RequestContext
from pd_runtime.scheduling.scorers.predicted_latency import PredictedLatencyScorer

from .common import A, B, C, context, state

P = "10.0.0.9:8100"


def teach(model: LatencyModel, address: str, intercept: float, slope: float, n: int = 40) -> None:
    for i in range(n):
        x = 100 + (i * 137) % 3000
        model.observe_ttft(address, x, intercept + slope * x)


def with_model(ctx: RequestContext, model: LatencyModel) -> RequestContext:
    ctx.latency = model
    return ctx


# ---- the model ------------------------------------------------------------------------------


def test_learns_a_known_slope_and_intercept() -> None:
    line = EWLine(half_life=32)
    for i in range(200):
        x = float(50 + (i * 97) % 4000)
        line.update(x, 0.02 + 1.5e-4 * x)
    assert line.slope == pytest.approx(1.5e-4, rel=1e-6)
    assert line.intercept == pytest.approx(0.02, rel=1e-6)
    assert line.predict(2000) == pytest.approx(0.02 + 0.3)


def test_learns_through_noise() -> None:
    import random

    rng = random.Random(1)
    line = EWLine(half_life=64)
    for _ in range(2000):
        x = rng.uniform(0, 4000)
        line.update(x, 0.05 + 2e-4 * x + rng.gauss(0, 0.02))
    assert line.slope == pytest.approx(2e-4, rel=0.1)
    assert line.intercept == pytest.approx(0.05, abs=0.02)


def test_adapts_when_an_endpoint_slows_down() -> None:
    model = LatencyModel(min_samples=8, half_life=16)
    teach(model, A, 0.01, 1e-4, n=100)
    before = model.ttft(A, 2000)
    assert before == pytest.approx(0.21, rel=1e-3)
    teach(model, A, 0.01, 4e-4, n=32)  # the worker is now 4x slower per token
    halfway = model.ttft(A, 2000)
    assert 0.5 < halfway < 0.81  # two half-lives: most of the way there
    teach(model, A, 0.01, 4e-4, n=100)
    assert model.ttft(A, 2000) == pytest.approx(0.81, rel=0.02)


def test_constant_x_falls_back_to_a_line_through_the_origin() -> None:
    line = EWLine()
    for _ in range(10):
        line.update(1000, 0.5)
    assert (line.slope, line.intercept) == (pytest.approx(5e-4), 0.0)
    line = EWLine()
    for _ in range(10):
        line.update(0, 0.2)  # no tokens at all: the time is the intercept
    assert (line.slope, line.intercept) == (0.0, pytest.approx(0.2))


def test_slope_and_intercept_never_go_negative() -> None:
    line = EWLine()
    for x in range(0, 1000, 50):
        line.update(x, 1.0 - x / 2000)  # faster with more tokens: nonsense, clamp
    assert line.slope == 0.0 and line.intercept > 0
    line = EWLine()
    for x in range(100, 1000, 50):
        line.update(x, max(0.0, -0.2 + x / 1000))
    assert line.intercept == 0.0 and line.slope > 0


def test_cold_until_min_samples() -> None:
    model = LatencyModel(min_samples=8)
    assert not model.warm(A) and model.ttft(A, 100) == 0.0
    teach(model, A, 0.01, 1e-4, n=7)
    assert not model.warm(A)
    teach(model, A, 0.01, 1e-4, n=1)
    assert model.warm(A) and not model.warm(B)
    assert not model.warm_tpot(A)


def test_transfer_rate_from_nixl_counters_and_tokens() -> None:
    t = TransferEstimator()
    assert t.seconds_per_token is None
    t.tokens(1000)
    t.counters(5.0, 10)  # first reading: a baseline only
    assert t.seconds_per_token is None
    t.counters(5.2, 12)  # two transfers of 0.1 s
    assert t.seconds_per_token == pytest.approx(0.1 / 1000)
    t.counters(0.1, 1)  # worker restarted: counters went back, start over
    assert t.n == 1
    model = LatencyModel(transfer_s_per_token=2e-5)
    assert model.transfer_s(A, 1000) == pytest.approx(0.02)  # the configured constant
    model.observe_transfer(A, 1000, 1.0, 10)
    model.observe_transfer(A, 1000, 1.5, 11)
    assert model.transfer_s(A, 1000) == pytest.approx(0.5)  # measured wins
    assert model.transfer_s(B, 1000) == pytest.approx(0.02)


def test_pd_observation_teaches_the_prefill_line_net_of_transfer_and_handover() -> None:
    model = LatencyModel(min_samples=1, handover_s=0.01, transfer_s_per_token=1e-5)
    for x in (500, 1000, 2000, 4000):
        model.observe_pd_ttft(P, A, x, x, 0.02 + 5e-5 * x + 1e-5 * x + 0.01)
    assert model.ttft(P, 1000) == pytest.approx(0.02 + 0.05)
    assert model.pd_ttft(P, A, 1000, 1000) == pytest.approx(0.02 + 0.05 + 0.01 + 0.01)


# ---- the scorer -----------------------------------------------------------------------------


def test_scorer_ranks_a_fast_endpoint_above_a_slow_one_once_learned() -> None:
    model = LatencyModel(min_samples=8)
    scorer = PredictedLatencyScorer()
    ctx = with_model(context(list(range(400))), model)
    endpoints = [state(A), state(B)]
    assert scorer.score(ctx, endpoints) == {A: 1.0, B: 1.0}  # cold: neutral
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 3e-4)
    scores = scorer.score(ctx, endpoints)
    assert scores[A] == 1.0
    assert scores[B] == pytest.approx((0.01 + 0.04) / (0.01 + 0.12))
    # Queued prefill work counts: A buried under 5000 tokens is now the slower one.
    endpoints[0].pending_prefill_tokens = 5000
    scores = scorer.score(ctx, endpoints)
    assert scores[B] == 1.0 and scores[A] < 0.5


def test_scorer_keeps_a_cold_endpoint_neutral_among_warm_ones() -> None:
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 3e-4)
    ctx = with_model(context(list(range(400))), model)
    scores = PredictedLatencyScorer().score(ctx, [state(A), state(B), state(C)])
    assert scores[C] == 1.0 and scores[A] == 1.0 and 0 < scores[B] < 1
    assert PredictedLatencyScorer().score(context([1, 2]), [state(A)]) == {A: 1.0}  # no model


def test_scorer_counts_the_whole_answer_where_one_endpoint_decodes_slower() -> None:
    # Same prefill speed; B decodes 5x slower. On TTFT alone they tie; over a 32-token answer
    # A wins, by the ratio of their predicted completion times.
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 1e-4)
    for batch in range(1, 9):
        model.observe_tpot(A, batch, 0.008 + 0.001 * batch)
        model.observe_tpot(B, batch, 0.040 + 0.005 * batch)
    ctx = with_model(context(list(range(400))), model)
    ctx.max_new_tokens = 32
    a, b = state(A, in_flight_requests=3), state(B)
    scores = PredictedLatencyScorer().score(ctx, [a, b])
    ttft = 0.01 + 0.04
    assert scores[A] == 1.0
    assert scores[B] == pytest.approx((ttft + 31 * 0.012) / (ttft + 31 * 0.045))
    # The batch counts: A with 40 requests in flight (TPOT 49 ms) is now the slower one.
    a.in_flight_requests = 40
    assert PredictedLatencyScorer().score(ctx, [a, b])[A] < 1.0
    # objective ttft: the old behaviour, a tie.
    assert PredictedLatencyScorer(objective="ttft").score(ctx, [a, b]) == {A: 1.0, B: 1.0}


def test_scorer_compares_on_ttft_while_a_warm_candidate_has_no_tpot_yet() -> None:
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 2e-4)
    for batch in range(1, 9):
        model.observe_tpot(A, batch, 0.5)  # very slow decode, but B's is unknown
    ctx = with_model(context(list(range(400))), model)
    ctx.max_new_tokens = 32
    scores = PredictedLatencyScorer().score(ctx, [state(A), state(B)])
    assert scores[A] == 1.0 and scores[B] == pytest.approx(0.05 / 0.09)
    with pytest.raises(ValueError, match="objective"):
        PredictedLatencyScorer(objective="e2e")  # type: ignore[arg-type]


def test_an_unanswered_request_bounds_the_predicted_ttft_warm_or_cold() -> None:
    import time

    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 1e-4)
    ctx = with_model(context(list(range(400))), model)  # 0.05 s predicted at A and B
    a, b, c = state(A), state(B), state(C)  # C is cold
    assert PredictedLatencyScorer().score(ctx, [a, b, c]) == {A: 1.0, B: 1.0, C: 1.0}
    now = time.monotonic()
    b.awaiting_first_token[1] = now - 0.5  # B: a request waiting 0.5 s for its first token
    b.awaiting_first_token[2] = now - 0.1  # (the oldest one counts)
    c.awaiting_first_token[3] = now - 2.0  # C: cold, but one request stuck for 2 s
    scores = PredictedLatencyScorer().score(ctx, [a, b, c])
    assert scores[A] == 1.0
    assert scores[B] == pytest.approx(0.05 / 0.5, rel=0.05)
    assert scores[C] == pytest.approx(0.05 / 2.0, rel=0.05)
    # A cold endpoint's short wait never makes it the reference nor lifts it above neutral.
    c.awaiting_first_token[3] = time.monotonic() - 0.01
    assert PredictedLatencyScorer().score(ctx, [a, c])[C] == 1.0


def test_scorer_is_registered_by_name() -> None:
    from pd_runtime.scheduling.plugins import SCORERS, load_builtin_plugins

    load_builtin_plugins()
    assert isinstance(SCORERS.create("predicted-latency"), PredictedLatencyScorer)


# ---- the slo filter -------------------------------------------------------------------------


def slo_ctx(model: LatencyModel, tokens: int, **headers: str) -> RequestContext:
    ctx = with_model(context(list(range(tokens))), model)
    ctx.request.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return ctx


def test_slo_filter_keeps_only_endpoints_predicted_to_meet_the_target() -> None:
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)  # 1000 tokens: 110 ms
    teach(model, B, 0.01, 3e-4)  # 310 ms
    endpoints = [state(A), state(B), state(C)]  # C cold: kept
    ctx = slo_ctx(model, 1000, x_slo_ttft_ms="200")
    assert [e.address for e in SLOFilter().filter(ctx, endpoints)] == [A, C]
    assert ctx.slo == "met"
    ctx = slo_ctx(model, 1000)  # no header: the filter's own target
    assert [e.address for e in SLOFilter(ttft_ms=400).filter(ctx, endpoints)] == [A, B, C]
    assert ctx.slo == "met"


def test_slo_filter_without_targets_keeps_all_and_leaves_no_mark() -> None:
    model = LatencyModel(min_samples=1)
    teach(model, A, 0.01, 1e-4)
    endpoints = [state(A)]
    ctx = slo_ctx(model, 1000, x_slo_ttft_ms="not-a-number")
    assert SLOFilter().filter(ctx, endpoints) == endpoints
    assert ctx.slo is None


def test_slo_filter_keeps_the_most_headroom_and_reports_unmet() -> None:
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    teach(model, B, 0.01, 3e-4)
    ctx = slo_ctx(model, 1000, x_slo_ttft_ms="50")
    kept = SLOFilter().filter(ctx, [state(B), state(A)])
    assert [e.address for e in kept] == [A] and ctx.slo == "unmet"


def test_slo_filter_checks_tpot_at_the_batch_with_this_request() -> None:
    model = LatencyModel(min_samples=4)
    for batch in range(1, 9):
        model.observe_tpot(A, batch, 0.01 + 0.005 * batch)
        model.observe_tpot(B, batch, 0.02 + 0.005 * batch)
    a, b = state(A, in_flight_requests=6), state(B, in_flight_requests=1)
    # A at 7: 45 ms; B at 2: 30 ms.
    ctx = slo_ctx(model, 10, x_slo_tpot_ms="40")
    assert [e.address for e in SLOFilter().filter(ctx, [a, b])] == [B] and ctx.slo == "met"
    ctx = slo_ctx(model, 10, x_slo_tpot_ms="20")
    assert [e.address for e in SLOFilter().filter(ctx, [a, b])] == [B] and ctx.slo == "unmet"


def test_slo_filter_counts_the_wait_of_an_unanswered_request_even_when_cold() -> None:
    import time

    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)
    ctx = slo_ctx(model, 400, x_slo_ttft_ms="500")
    a, c = state(A), state(C)  # C is cold: kept while nothing says it is slow
    assert [e.address for e in SLOFilter().filter(ctx, [a, c])] == [A, C]
    c.awaiting_first_token[1] = time.monotonic() - 2.0  # a request stuck there for 2 s
    assert [e.address for e in SLOFilter().filter(ctx, [a, c])] == [A]
    a.awaiting_first_token[2] = time.monotonic() - 1.0  # A too: none can meet 500 ms
    assert [e.address for e in SLOFilter().filter(ctx, [a, c])] == [A] and ctx.slo == "unmet"


def test_slo_filter_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        SLOFilter(ttft_ms=0)
    with pytest.raises(TypeError):
        SLOFilter(ttft=1)  # type: ignore[call-arg]
