"""The sidecar's request chain against recording fake engines (fakes: they fail, hang and break
streams on demand, which real vLLM-CPU workers cannot be made to do reliably)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import FakeEngine, sidecar_chain


@pytest.fixture
def chain() -> Iterator[tuple[str, FakeEngine, FakeEngine, str]]:
    with sidecar_chain(prefill_timeout_s=1.0) as parts:
        yield parts


BODY = {"model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0}


def test_without_header_it_is_a_transparent_proxy(chain) -> None:
    sidecar, prefill, decode, _ = chain
    response = httpx.post(f"{sidecar}/v1/completions", json=BODY, headers={"x-request-id": "r1"})
    assert response.status_code == 200
    assert response.json()["served_by"] == "decode"
    assert prefill.requests == []
    assert decode.requests == [BODY]
    assert decode.headers[0]["x-request-id"] == "r1"


def test_with_header_it_runs_prefill_then_decode_with_transfer_params(chain) -> None:
    sidecar, prefill, decode, prefiller = chain
    response = httpx.post(
        f"{sidecar}/v1/completions",
        json=BODY,
        headers={"x-prefiller-host-port": prefiller, "x-request-id": "r2"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["served_by"] == "decode"
    assert prefill.requests[0]["max_tokens"] == 1 and prefill.requests[0]["stream"] is False
    assert prefill.requests[0]["kv_transfer_params"]["do_remote_decode"] is True
    assert decode.requests[0]["kv_transfer_params"]["remote_engine_id"] == "prefill-engine"
    assert decode.requests[0]["max_tokens"] == 7
    # The routing header stops at the sidecar; the request id travels on both hops.
    assert "x-prefiller-host-port" not in decode.headers[0]
    assert prefill.headers[0]["x-request-id"] == decode.headers[0]["x-request-id"] == "r2"
    metrics = httpx.get(f"{sidecar}/sidecar/metrics").text
    assert 'pd_sidecar_requests_total{mode="disaggregated"} 1.0' in metrics


def test_streaming_chat_is_streamed_back_as_sse(chain) -> None:
    sidecar, prefill, decode, prefiller = chain
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{sidecar}/v1/chat/completions",
        json=body,
        headers={"x-prefiller-host-port": prefiller},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1", "t2"]
    assert prefill.requests[0]["stream"] is False and "stream_options" not in prefill.requests[0]
    assert decode.requests[0]["stream"] is True
    assert decode.requests[0]["stream_options"] == {"include_usage": True}


def test_untrusted_prefiller_is_refused_and_nothing_is_sent(chain) -> None:
    sidecar, prefill, decode, _ = chain
    response = httpx.post(
        f"{sidecar}/v1/completions",
        json=BODY,
        headers={"x-prefiller-host-port": "169.254.169.254:80"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "PermissionDeniedError"
    assert prefill.requests == [] and decode.requests == []


@pytest.mark.parametrize("params", [{"remote_host": "10.1.2.3", "remote_port": 9}, None, "x"])
def test_client_transfer_params_are_dropped(chain, params) -> None:
    sidecar, _, decode, _ = chain
    hostile = {**BODY, "kv_transfer_params": params}
    assert httpx.post(f"{sidecar}/v1/completions", json=hostile).status_code == 200
    assert decode.requests == [BODY]


def test_a_nested_kv_transfer_params_is_not_top_level_and_the_body_passes_unchanged(chain) -> None:
    sidecar, _, decode, _ = chain
    body = {**BODY, "extra": {"kv_transfer_params": 1}, "prompt": "héllo ✓"}
    assert httpx.post(f"{sidecar}/v1/completions", json=body).status_code == 200
    assert decode.requests == [body]


@pytest.mark.parametrize("failure", ["status", "hang"])
def test_failed_prefill_falls_back_to_local_decode(chain, failure: str) -> None:
    sidecar, prefill, decode, prefiller = chain
    if failure == "status":
        prefill.fail_with = 500
    else:
        prefill.hang_s = 3.0  # longer than the sidecar's 1 s prefill timeout
    response = httpx.post(
        f"{sidecar}/v1/completions",
        json=BODY,
        timeout=10,
        headers={"x-prefiller-host-port": prefiller},
    )
    assert response.status_code == 200
    assert len(prefill.requests) == 1
    assert "kv_transfer_params" not in decode.requests[0]
    assert (
        'pd_sidecar_requests_total{mode="fallback"} 1.0'
        in httpx.get(f"{sidecar}/sidecar/metrics").text
    )


def test_bad_json_gets_an_openai_error(chain) -> None:
    sidecar, _, decode, _ = chain
    response = httpx.post(
        f"{sidecar}/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400
    assert decode.requests == []


def test_other_paths_pass_through_to_the_decode_worker(chain) -> None:
    sidecar, *_ = chain
    assert httpx.get(f"{sidecar}/v1/models").json()["data"][0]["served_by"] == "decode"
    assert httpx.get(f"{sidecar}/health").status_code == 200


def test_a_stream_that_breaks_midway_ends_with_an_error_event(chain) -> None:
    sidecar, _, decode, _ = chain
    decode.break_stream_after = 1
    body = {**BODY, "stream": True}
    with httpx.stream("POST", f"{sidecar}/v1/completions", json=body, timeout=10) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0][6:])["choices"][0]["text"] == "t0"
    assert "error" in json.loads(events[-1][6:])
