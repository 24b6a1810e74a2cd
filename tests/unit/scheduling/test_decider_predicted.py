"""PDDecider's predicted mode: direct when the transfer costs more than it saves, P/D when the
decode endpoint is busy and the prompt long, the margin, and while cold the threshold rule or
the exploring of the side that has not been timed."""

from __future__ import annotations

from pd_runtime.scheduling.decider import Decision, PDDecider
from pd_runtime.scheduling.latency import LatencyModel

from .common import A, context, state
from .test_latency import P, teach, with_model


def warm_pair(transfer_s_per_token: float, *, min_samples: int = 8) -> LatencyModel:
    model = LatencyModel(
        min_samples=min_samples, handover_s=0.01, transfer_s_per_token=transfer_s_per_token
    )
    teach(model, A, 0.01, 1e-4)  # the decode endpoint prefills at 10 k tokens/s
    for i in range(40):  # the prefill endpoint at 20 k tokens/s, learned from P/D requests
        x = 100 + (i * 137) % 3000
        model.observe_pd_ttft(P, A, x, x, 0.01 + 5e-5 * x + transfer_s_per_token * x + 0.01)
    return model


PREDICTED = PDDecider(threshold_tokens=256, mode="predicted", margin=0.2)


def test_predicted_chooses_direct_when_the_transfer_costs_more_than_it_saves() -> None:
    model = warm_pair(transfer_s_per_token=1e-3)  # a slow link: 1 s per 1000 tokens
    ctx = with_model(context(list(range(1000))), model)
    decision = PREDICTED.decide(ctx, state(A), True, [state(P, "prefill")])
    assert decision == Decision(False, "predicted-direct-faster", 1000)
    # The threshold rule would have disaggregated it.
    assert PDDecider(threshold_tokens=256).decide(ctx, state(A), True).disaggregate


def test_predicted_chooses_pd_when_the_decode_endpoint_is_busy_and_the_prompt_long() -> None:
    model = warm_pair(transfer_s_per_token=1e-5)
    ctx = with_model(context(list(range(2000))), model)
    busy = state(A, pending_prefill_tokens=8000)  # direct: 0.01 + 1e-4 * 10000 = 1.01 s
    decision = PREDICTED.decide(ctx, busy, True, [state(P, "prefill")])  # P/D: ~0.14 s
    assert decision == Decision(True, "predicted-pd-faster", 2000)


def test_predicted_needs_the_margin() -> None:
    model = warm_pair(transfer_s_per_token=0.0)
    # 300 tokens: direct 0.04 s, P/D 0.01 + 0.015 + 0.01 = 0.035 s: faster, not by 20 %.
    ctx = with_model(context(list(range(300))), model)
    prefills = [state(P, "prefill")]
    assert PREDICTED.decide(ctx, state(A), True, prefills).reason == "predicted-direct-faster"
    no_margin = PDDecider(mode="predicted", margin=0.0)
    assert no_margin.decide(ctx, state(A), True, prefills).reason == "predicted-pd-faster"


def test_while_cold_the_threshold_decides_unless_it_would_leave_a_side_unlearnt() -> None:
    model = LatencyModel(min_samples=8)
    teach(model, A, 0.01, 1e-4)  # decode warm, prefill cold
    prefills = [state(P, "prefill")]
    long, short = (with_model(context(list(range(n))), model) for n in (300, 100))
    assert PREDICTED.decide(long, state(A), True, prefills) == Decision(True, "cold-threshold", 300)
    # The threshold would serve it directly, which teaches the cold prefill side nothing.
    assert PREDICTED.decide(short, state(A), True, prefills) == Decision(
        True, "cold-explore-pd", 100
    )
    # A warm prefill endpoint that is unhealthy does not count, and no healthy one: no exploring.
    model = warm_pair(1e-5)
    unhealthy = [state(P, "prefill", healthy=False)]
    short = with_model(context(list(range(100))), model)
    assert PREDICTED.decide(short, state(A), True, unhealthy) == Decision(
        False, "cold-threshold", 100
    )
    # The decode endpoint cold: a long prompt is served directly to time it, a short one anyway.
    cold_decode = LatencyModel(min_samples=8)
    long = with_model(context(list(range(300))), cold_decode)
    assert PREDICTED.decide(long, state(A), True, prefills) == Decision(
        False, "cold-explore-direct", 300
    )
    short = with_model(context(list(range(100))), cold_decode)
    assert PREDICTED.decide(short, state(A), True, prefills).reason == "cold-explore-pd"
    # Nothing to weigh without a prefill endpoint or a tokenized prompt: as before.
    assert PREDICTED.decide(short, state(A), False, prefills).reason == "no-prefill-endpoint"
    untokenized = with_model(context(None), model)
    assert PREDICTED.decide(untokenized, state(A), True, prefills).reason == (
        "prompt-not-tokenized"
    )
