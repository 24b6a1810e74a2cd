from __future__ import annotations

import copy

from pd_runtime.sidecar.rewrite import (
    REMOTE_DECODE_REQUEST,
    build_decode_request,
    build_prefill_request,
)

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_completion_tokens": 50,
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 2,
    "min_tokens": 5,
    "temperature": 0,
}


def test_prefill_request_is_one_token_non_streaming_and_asks_for_remote_decode() -> None:
    original = copy.deepcopy(CHAT)
    prefill = build_prefill_request(CHAT)
    assert prefill["max_tokens"] == 1
    assert prefill["max_completion_tokens"] == 1
    assert prefill["stream"] is False
    assert "stream_options" not in prefill
    assert "min_tokens" not in prefill
    assert prefill["n"] == 1
    assert prefill["kv_transfer_params"] == REMOTE_DECODE_REQUEST
    # Everything that shapes the prompt is untouched, and the client's body is not mutated.
    assert prefill["messages"] == CHAT["messages"] and prefill["temperature"] == 0
    assert original == CHAT


def test_prefill_request_for_completions_without_max_completion_tokens() -> None:
    prefill = build_prefill_request({"model": "m", "prompt": "abc", "max_tokens": 99})
    assert prefill["max_tokens"] == 1
    assert "max_completion_tokens" not in prefill
    assert prefill["prompt"] == "abc"


def test_decode_request_keeps_client_body_and_adds_prefiller_params() -> None:
    params = {"remote_engine_id": "e", "remote_block_ids": [1, 2], "remote_host": "h"}
    decode = build_decode_request(CHAT, params)
    assert decode["kv_transfer_params"] == params
    assert {k: v for k, v in decode.items() if k != "kv_transfer_params"} == CHAT
    assert "kv_transfer_params" not in CHAT


def test_client_supplied_transfer_params_never_reach_a_worker() -> None:
    hostile = {**CHAT, "kv_transfer_params": {"remote_host": "10.0.0.66", "remote_port": 1}}
    assert build_prefill_request(hostile)["kv_transfer_params"] == REMOTE_DECODE_REQUEST
    assert "kv_transfer_params" not in build_decode_request(hostile, None)
    assert build_decode_request(hostile, {"remote_host": "ok"})["kv_transfer_params"] == {
        "remote_host": "ok"
    }


def test_decode_without_params_is_the_plain_request() -> None:
    assert build_decode_request(CHAT, None) == CHAT


def test_bodies_are_shallow_copies_that_share_the_unchanged_values() -> None:
    prefill = build_prefill_request(CHAT)
    decode = build_decode_request(CHAT, {"remote_host": "h"})
    assert prefill is not CHAT and decode is not CHAT
    # No deep copy per request: the prompt is shared, not copied, and never mutated.
    assert prefill["messages"] is CHAT["messages"] is decode["messages"]
