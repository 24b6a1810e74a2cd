"""SchedulingProfile: built from YAML-shaped dicts, errors that name the field, weighted totals."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pd_runtime.errors import ConfigError, NoEndpointError
from pd_runtime.scheduling.filters.healthy import HealthyFilter
from pd_runtime.scheduling.filters.not_saturated import NotSaturatedFilter
from pd_runtime.scheduling.pickers.random import RandomPicker
from pd_runtime.scheduling.profile import PluginSpec, ProfileConfig, SchedulingProfile
from pd_runtime.scheduling.scorers.prefix_cache import PrefixCacheScorer
from pd_runtime.scheduling.scorers.queue_depth import QueueDepthScorer
from pd_runtime.scheduling.scorers.session_affinity import SessionAffinityScorer

from .common import A, B, C, context, state

PROMPT = list(range(100, 116))  # 4 blocks of 4


def profile(raw: dict[str, Any], role: str = "decode") -> SchedulingProfile:
    return SchedulingProfile(role, ProfileConfig.model_validate(raw))


def test_profile_from_yaml_shaped_dict() -> None:
    p = profile(
        {
            "filters": [{"type": "healthy"}, {"type": "not-saturated", "max_in_flight": 3}],
            "scorers": [
                {"type": "prefix-cache", "weight": 3},
                {"type": "queue-depth"},
                {"type": "session-affinity", "weight": 0.5, "max_sessions": 10},
            ],
            "picker": {"type": "random"},
        }
    )
    assert [type(f) for f in p.filters] == [HealthyFilter, NotSaturatedFilter]
    assert isinstance(p.filters[1], NotSaturatedFilter) and p.filters[1].max_in_flight == 3
    assert [(type(s), w) for s, w in p.scorers] == [
        (PrefixCacheScorer, 3.0),
        (QueueDepthScorer, 1.0),  # weight defaults to 1
        (SessionAffinityScorer, 0.5),
    ]
    assert isinstance(p.picker, RandomPicker)
    described = p.describe()
    assert described["filters"][1] == {
        "type": "not-saturated",
        "max_in_flight": 3,
        "max_waiting": 4,
        "max_kv_usage": 0.9,
    }
    assert described["scorers"][0] == {"type": "prefix-cache", "weight": 3.0}
    assert described["scorers"][2]["max_sessions"] == 10
    assert described["picker"] == {"type": "random"}


def test_default_picker_is_max_score_and_lists_default_empty() -> None:
    p = profile({})
    assert p.filters == [] and p.scorers == []
    assert p.describe()["picker"] == {"type": "max-score", "tie_break": "random"}


def test_plugin_spec_passes_every_other_key_as_a_parameter() -> None:
    spec = PluginSpec.model_validate({"type": "not-saturated", "max_in_flight": 2, "weight": 2})
    assert spec.params == {"max_in_flight": 2}
    assert spec.weight == 2.0


@pytest.mark.parametrize(
    ("raw", "where", "what"),
    [
        ({"filters": [{"type": "helthy"}]}, "scheduler.params.profiles.decode.filters", "helthy"),
        (
            {"scorers": [{"type": "prefix-cash", "weight": 2}]},
            "scheduler.params.profiles.decode.scorers",
            "prefix-cash",
        ),
        ({"picker": {"type": "best"}}, "scheduler.params.profiles.decode.picker", "best"),
    ],
)
def test_unknown_plugin_type_is_a_config_error_naming_the_field(
    raw: dict[str, Any], where: str, what: str
) -> None:
    with pytest.raises(ConfigError) as info:
        profile(raw)
    message = str(info.value)
    assert message.startswith(f"{where}: ")
    assert repr(what) in message
    assert "choose one of" in message  # lists what exists


def test_unknown_plugin_parameter_is_a_config_error_naming_field_and_parameter() -> None:
    with pytest.raises(ConfigError) as info:
        profile({"filters": [{"type": "not-saturated", "max_inflight": 4}]}, role="prefill")
    message = str(info.value)
    assert message.startswith("scheduler.params.profiles.prefill.filters: ")
    assert "not-saturated" in message and "max_inflight" in message

    with pytest.raises(ConfigError, match=r"profiles\.decode\.scorers: .*token_shar"):
        profile({"scorers": [{"type": "in-flight-load", "token_shar": 0.5}]})
    with pytest.raises(ConfigError, match=r"profiles\.decode\.picker: .*tolerence"):
        profile({"picker": {"type": "max-score", "tolerence": 0.1}})


def test_bad_plugin_parameter_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.decode\.scorers: .*token_share"):
        profile({"scorers": [{"type": "in-flight-load", "token_share": 2}]})
    with pytest.raises(ConfigError, match="half_life_requests"):
        profile({"scorers": [{"type": "cold-spreader", "half_life_requests": 0}]})


def test_profile_shape_errors_are_validation_errors() -> None:
    with pytest.raises(ValidationError):
        ProfileConfig.model_validate({"scorer": [{"type": "prefix-cache"}]})  # typo'd section
    with pytest.raises(ValidationError):
        ProfileConfig.model_validate({"scorers": [{"type": "prefix-cache", "weight": -1}]})
    with pytest.raises(ValidationError):
        ProfileConfig.model_validate({"scorers": [{"weight": 1}]})  # no type


def test_totals_are_weighted_means_of_the_scores() -> None:
    p = profile(
        {"scorers": [{"type": "prefix-cache", "weight": 3}, {"type": "queue-depth", "weight": 1}]}
    )
    endpoints = [state(A, waiting=10.0), state(B, waiting=0.0), state(C, waiting=5.0)]
    result = p.run(context(PROMPT, cached={A: 4, C: 2}), endpoints)
    assert result.scores == {
        "prefix-cache": {A: 1.0, B: 0.0, C: 0.5},
        "queue-depth": {A: 0.0, B: 1.0, C: 0.5},
    }
    assert result.totals == pytest.approx({A: 0.75, B: 0.25, C: 0.5})
    assert result.picked.address == A
    assert all(0.0 <= t <= 1.0 for t in result.totals.values())


def test_totals_stay_in_unit_interval_when_every_scorer_agrees() -> None:
    p = profile({"scorers": [{"type": "queue-depth", "weight": 5}, {"type": "prefix-cache"}]})
    result = p.run(context(PROMPT, cached={A: 4}), [state(A), state(B, waiting=1.0)])
    assert result.totals == pytest.approx({A: 1.0, B: 0.0})


def test_all_zero_weights_give_zero_totals_not_a_division_error() -> None:
    p = profile({"scorers": [{"type": "queue-depth", "weight": 0}]})
    result = p.run(context(PROMPT), [state(A), state(B, waiting=3.0)])
    assert result.totals == {A: 0.0, B: 0.0}
    assert result.scores == {"queue-depth": {A: 1.0, B: 0.0}}


def test_a_filter_removing_everyone_is_no_endpoint() -> None:
    p = profile({"filters": [{"type": "healthy"}], "scorers": [{"type": "queue-depth"}]})
    with pytest.raises(
        NoEndpointError, match=r"no decode endpoint can take the request \(healthy\)"
    ):
        p.run(context(PROMPT), [state(A, healthy=False), state(B, healthy=False)])


def test_no_candidates_is_no_endpoint_with_or_without_filters() -> None:
    with pytest.raises(NoEndpointError, match="no prefill endpoint is configured"):
        profile({}, role="prefill").run(context(PROMPT), [])
    with pytest.raises(NoEndpointError, match="no prefill endpoint"):
        profile({"filters": [{"type": "not-saturated"}]}, role="prefill").run(context(PROMPT), [])


def test_run_reports_filtered_out_and_scores_only_survivors() -> None:
    p = profile({"filters": [{"type": "healthy"}], "scorers": [{"type": "queue-depth"}]})
    result = p.run(context(PROMPT), [state(A, healthy=False), state(B), state(C, waiting=2.0)])
    assert result.filtered_out == (A,)
    assert set(result.totals) == {B, C}
    assert result.scores["queue-depth"] == {B: 1.0, C: 0.0}
    assert result.picked.address == B


def test_run_tells_stateful_scorers_what_was_picked() -> None:
    p = profile({"scorers": [{"type": "session-affinity"}, {"type": "queue-depth"}]})
    endpoints = [state(A, waiting=1.0), state(B)]
    first = p.run(context(PROMPT, session="s1"), endpoints)
    assert first.picked.address == B
    endpoints[1].waiting = 1.0  # now equal load: only the session decides
    for _ in range(10):
        assert p.run(context(PROMPT, session="s1"), endpoints).picked.address == B
