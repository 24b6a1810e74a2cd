"""PDDecider: disaggregate exactly when the decode endpoint's uncached tokens reach the threshold."""

from __future__ import annotations

import pytest

from pd_runtime.scheduling.decider import Decision, PDDecider

from .common import A, B, context, state


@pytest.mark.parametrize(
    ("prompt_len", "cached_blocks", "disaggregate", "uncached"),
    [
        (16, 2, True, 8),  # exactly the threshold: disaggregate
        (15, 2, False, 7),  # one below
        (12, 0, True, 12),
        (12, 1, True, 8),
        (12, 2, False, 4),
        (7, 0, False, 7),  # short prompt, nothing cached
        (8, 0, True, 8),
        (12, 3, False, 0),  # fully cached
    ],
)
def test_threshold_boundaries(
    prompt_len: int, cached_blocks: int, disaggregate: bool, uncached: int
) -> None:
    ctx = context(list(range(prompt_len)), cached={A: cached_blocks})
    decision = PDDecider(threshold_tokens=8).decide(ctx, state(A), has_prefill=True)
    reason = "uncached-above-threshold" if disaggregate else "uncached-below-threshold"
    assert decision == Decision(disaggregate, reason, uncached)


def test_only_the_chosen_decode_endpoints_cache_counts() -> None:
    ctx = context(list(range(16)), cached={B: 4})  # all on B, nothing on A
    decider = PDDecider(threshold_tokens=8)
    assert decider.decide(ctx, state(A), has_prefill=True).disaggregate is True
    assert decider.decide(ctx, state(B), has_prefill=True).disaggregate is False


def test_cached_tokens_beyond_the_prompt_count_as_zero_uncached() -> None:
    # A claim longer than the prompt (e.g. pending blocks of a longer prompt) never goes negative.
    ctx = context(list(range(8)), cached={A: 5})
    assert PDDecider(threshold_tokens=1).decide(ctx, state(A), True) == Decision(
        False, "uncached-below-threshold", 0
    )


def test_zero_threshold_always_disaggregates() -> None:
    ctx = context(list(range(8)), cached={A: 2})
    assert PDDecider(threshold_tokens=0).decide(ctx, state(A), True).disaggregate is True


def test_no_prefill_endpoint_never_disaggregates() -> None:
    decider = PDDecider(threshold_tokens=8)
    for ctx in (context(list(range(100))), context(None)):
        assert decider.decide(ctx, state(A), has_prefill=False) == Decision(
            False, "no-prefill-endpoint", None
        )


def test_untokenized_prompt_is_treated_as_fully_uncached() -> None:
    decision = PDDecider(threshold_tokens=10_000).decide(context(None), state(A), True)
    assert decision == Decision(True, "prompt-not-tokenized", None)


def test_default_threshold() -> None:
    assert PDDecider().threshold_tokens == 256
    assert PDDecider().decide(context(list(range(255))), state(A), True).disaggregate is False
    assert PDDecider().decide(context(list(range(256))), state(A), True).disaggregate is True
