"""KVAwareScheduler and the latency model: the prefill work it queues and unqueues, what the
coordinator's reports teach, the slo mark, and the decider modes from the config."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pd_runtime.errors import ConfigError
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler

from .test_kv_aware import D0, D1, P0, PROMPT, make, request


def prompt(i: int, n: int = 20) -> list[int]:
    """A prompt sharing nothing with the others."""
    return list(range(10_000 * (i + 1), 10_000 * (i + 1) + n))


def on(req: SchedulingRequest, address: str) -> SchedulingRequest:
    """Steer ``req`` to one decode endpoint (the other one excluded)."""
    return replace(req, exclude=frozenset({D0, D1} - {address}))


def test_direct_request_queues_its_prefill_until_the_first_chunk_and_teaches_ttft() -> None:
    s = make(prefill=False, latency_min_samples=1)
    req = on(request(prompt(0)), D0)
    result = s.schedule(req)
    decode = s.states[D0]
    assert result.prefill is None and decode.pending_prefill_tokens == 20
    # A second request queued behind it: its work is its own 30 tokens and the 20 ahead.
    req2 = on(request(prompt(1, 30), rid="r2"), D0)
    result2 = s.schedule(req2)
    assert decode.pending_prefill_tokens == 50
    s.first_chunk(req, result, 0.25)
    assert decode.pending_prefill_tokens == 30
    assert s.latency.describe()[D0]["ttft"]["n"] == 1
    assert s.latency.ttft(D0, 20) == pytest.approx(0.25)
    s.first_chunk(req2, result2, 0.5)
    assert s.latency.ttft(D0, 50) == pytest.approx(0.5)  # x was 30 + 20 queued
    assert s.latency.ttft(D0, 20) == pytest.approx(0.25)
    s.first_chunk(req, result, 9.0)  # at most once per attempt
    assert s.latency.describe()[D0]["ttft"]["n"] == 2
    s.stream_end(req, result, 0.02)
    assert s.latency.tpot(result.decode.address, 1) == pytest.approx(0.02)
    s.release(req, result)
    s.release(req2, result2)
    req3 = on(request(prompt(2), rid="r3"), D1)
    result3 = s.schedule(req3)
    assert s.states[D1].pending_prefill_tokens == 20
    s.release(req3, result3)  # never saw a first chunk: unqueued on release
    assert all(st.pending_prefill_tokens == 0 for st in s.states.values())
    assert s.debug_state()["pd_decider"] == "threshold"


def test_the_wait_for_the_first_token_is_tracked_per_prefilling_endpoint() -> None:
    import time

    s = make(prefill=False, pd_decider="predicted")
    stream = {"prompt": "x", "max_tokens": 10, "stream": True}
    req = on(request(prompt(0), body=stream), D0)
    req2 = on(request(prompt(1), body=stream, rid="r2"), D0)
    whole = on(request(prompt(2), rid="r3"), D0)  # not a stream: its first chunk is its last
    result, result2, result3 = s.schedule(req), s.schedule(req2), s.schedule(whole)
    state = s.states[D0]
    assert list(state.awaiting_first_token) == [id(req), id(req2)]  # oldest first
    s.release(whole, result3)
    assert state.first_token_wait(time.monotonic() + 1.0) >= 1.0
    assert s.states[D1].first_token_wait(time.monotonic()) == 0.0
    s.first_chunk(req, result, 0.1)
    assert list(state.awaiting_first_token) == [id(req2)]
    s.release(req, result)
    s.release(req2, result2)  # never answered: unqueued on release
    assert state.awaiting_first_token == {} and state.first_token_wait(time.monotonic()) == 0.0


def test_no_wait_is_tracked_where_nothing_reports_first_chunks() -> None:
    s = make(prefill=False)  # threshold decider, no latency scorer: answers are not timed
    assert not s.times_answers
    req = on(request(prompt(0), body={"prompt": "x", "stream": True}), D0)
    result = s.schedule(req)
    assert s.states[D0].awaiting_first_token == {}
    s.release(req, result)


def test_non_streamed_answer_unqueues_without_teaching() -> None:
    s = make(prefill=False)
    req = on(request(PROMPT), D0)
    result = s.schedule(req)
    s.first_chunk(req, result, None)
    assert s.states[D0].pending_prefill_tokens == 0
    assert D0 not in s.latency.describe()
    s.release(req, result)


def test_disaggregated_request_queues_on_the_prefill_endpoint_and_teaches_it() -> None:
    s = make(latency_min_samples=1, pd_handover_s=0.01, transfer_s_per_token=0.001)
    req = request(PROMPT)
    result = s.schedule(req)
    assert result.prefill is not None and result.prefill.address == P0
    assert s.states[P0].pending_prefill_tokens == len(PROMPT)
    assert s.states[result.decode.address].pending_prefill_tokens == 0
    s.first_chunk(req, result, 0.5)
    assert s.states[P0].pending_prefill_tokens == 0
    # What is left after 20 tokens x 1 ms of transfer and the 10 ms handover is P0's prefill.
    assert s.latency.ttft(P0, len(PROMPT)) == pytest.approx(0.5 - 0.02 - 0.01)
    s.release(req, result)


def test_nixl_counters_on_the_decode_state_teach_the_transfer_rate() -> None:
    s = make(latency_min_samples=1)
    decode = s.states[D0]
    for i, (total, count) in enumerate(((1.0, 10), (1.2, 11), (1.4, 12))):
        req = on(request(prompt(i), rid=f"r{i}"), D0)
        result = s.schedule(req)
        assert result.prefill is not None
        decode.nixl_xfer_seconds_sum, decode.nixl_xfer_count = total, count  # as scraped
        s.first_chunk(req, result, 0.3)
        s.release(req, result)
    # 0.2 s per transfer of 20 tokens.
    assert s.latency.describe()[D0]["transfer_s_per_token"] == pytest.approx(0.01)
    assert s.latency.transfer_s(D0, 100) == pytest.approx(1.0)


def test_slo_mark_reaches_the_result() -> None:
    profiles = {"decode": {"filters": [{"type": "slo"}], "scorers": [{"type": "in-flight-load"}]}}
    s = make(prefill=False, latency_min_samples=2, profiles=profiles)
    for i in range(4):  # both decode endpoints learn ~1 s TTFT
        req = on(request(prompt(i), rid=f"w{i}"), (D0, D1)[i % 2])
        result = s.schedule(req)
        s.first_chunk(req, result, 1.0)
        s.release(req, result)
    assert s.latency.warm(D0) and s.latency.warm(D1)
    assert s.schedule(request(PROMPT, rid="none")).slo is None
    assert s.schedule(request(PROMPT, rid="met", headers={"x-slo-ttft-ms": "5000"})).slo == "met"
    unmet = s.schedule(request(PROMPT, rid="unmet", headers={"x-slo-ttft-ms": "10"}))
    assert unmet.slo == "unmet"


def test_predicted_decider_from_the_config() -> None:
    s = make(pd_decider="predicted", pd_margin=0.5)
    assert s.decider.mode == "predicted" and s.decider.margin == 0.5
    result = s.schedule(request(PROMPT))  # above the threshold; the decode endpoint untimed
    assert result.reason == "cold-explore-direct" and result.prefill is None
    assert s.debug_state()["pd_decider"] == "predicted"
    with pytest.raises(ConfigError, match="pd_decider"):
        make(pd_decider="sometimes")


def test_the_latency_model_forgets_removed_endpoints() -> None:
    import asyncio

    s = make(prefill=False, latency_min_samples=1)
    req = request(PROMPT)
    result = s.schedule(req)
    s.first_chunk(req, result, 0.1)
    s.release(req, result)
    assert result.decode.address in s.latency.describe()
    keep = [e for e in s.endpoints if e.address != result.decode.address]
    asyncio.run(s.set_endpoints(keep))
    assert result.decode.address not in s.latency.describe()
    assert isinstance(s, KVAwareScheduler)


def test_predicted_decider_stops_disaggregating_where_pd_does_not_pay() -> None:
    """Every prompt above the threshold (the case the scenario benchmark caught: the threshold
    rule alone never timed the decode endpoint, so the decider stayed cold for good)."""
    s = make(pd_decider="predicted", latency_min_samples=2)
    reasons = []

    def serve(i: int, ttft_s: float) -> None:
        req = on(request(prompt(i, 20), rid=f"r{i}"), D0)
        result = s.schedule(req)
        reasons.append((result.reason, result.prefill is not None))
        s.first_chunk(req, result, ttft_s)
        s.release(req, result)

    serve(0, 0.01)  # the decode endpoint is timed first: fast
    serve(1, 0.01)
    serve(2, 1.0)  # then the prefill side, by the threshold: slow here
    serve(3, 1.0)
    assert reasons == [
        ("cold-explore-direct", False),
        ("cold-explore-direct", False),
        ("cold-threshold", True),
        ("cold-threshold", True),
    ]
    result = s.schedule(on(request(prompt(20, 20), rid="long"), D0))
    assert result.prefill is None and result.reason == "predicted-direct-faster"


def test_answers_are_timed_only_when_something_reads_the_latency_model() -> None:
    # The default profiles read nothing of it: the coordinator adds no per-chunk work.
    assert make().times_answers is False
    assert make(pd_decider="predicted").times_answers is True
    scorer = {"type": "predicted-latency", "weight": 1}
    assert make(profiles={"decode": {"scorers": [scorer]}}).times_answers is True
    assert make(profiles={"prefill": {"filters": [{"type": "slo"}]}}).times_answers is True


def test_the_latency_led_example_in_the_preset_is_the_profile_the_benchmark_measures() -> None:
    """configs/local-cpu.yaml shows, commented out, how to turn the latency-led setting on; it
    must stay valid and equal to what the bench's pd-latency-led front runs."""
    import textwrap
    from pathlib import Path

    import yaml

    from pd_runtime.scheduling.kv_aware import LATENCY_LED_DECODE_PROFILE, KVAwareParams

    preset = Path(__file__).parents[3] / "configs" / "local-cpu.yaml"
    block = preset.read_text().split("# Latency-led")[1].split("startup_timeout_s")[0]
    lines = [line.replace("# ", "", 1) for line in block.splitlines()[3:] if "#" in line]
    params = KVAwareParams.model_validate(yaml.safe_load(textwrap.dedent("\n".join(lines))))
    assert params.pd_decider == "predicted"
    assert params.profiles["decode"] == LATENCY_LED_DECODE_PROFILE
