from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from pd_runtime.errors import BadRequestError
from pd_runtime.sidecar.app import SidecarSettings
from pd_runtime.sidecar.connectors import CONNECTORS
from pd_runtime.sidecar.connectors.nixl import (
    REMOTE_DECODE_REQUEST,
    NixlConnector,
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


# -- the connector: the prefill hop as the NIXL protocol runs it ----------------------------------


def test_every_connector_is_registered_and_resolves() -> None:
    assert CONNECTORS.names() == ["nixl"]
    assert isinstance(CONNECTORS.create("nixl"), NixlConnector)


async def test_nixl_hop_passes_the_prefill_answers_params_to_decode() -> None:
    sent: list[dict[str, Any]] = []
    params = {"remote_engine_id": "e", "remote_block_ids": [1, 2]}

    async def prefill(body: dict[str, Any]) -> dict[str, Any] | None:
        sent.append(body)
        return {"kv_transfer_params": params}

    client = {"model": "m", "prompt": "hi", "max_tokens": 9, "kv_transfer_params": {"evil": 1}}
    result = await NixlConnector().disaggregate(client, prefill)
    assert sent[0]["max_tokens"] == 1 and sent[0]["kv_transfer_params"]["do_remote_decode"]
    assert result.transferred and result.decode_body["kv_transfer_params"] == params
    assert result.decode_body["max_tokens"] == 9
    assert client["kv_transfer_params"] == {"evil": 1}  # the client's dict is not changed


@pytest.mark.parametrize("answer", [None, {}, {"kv_transfer_params": None}])
async def test_nixl_hop_without_params_decodes_locally(answer: dict[str, Any] | None) -> None:
    async def prefill(body: dict[str, Any]) -> dict[str, Any] | None:
        return answer

    client = {"model": "m", "prompt": "hi"}
    result = await NixlConnector().disaggregate(client, prefill)
    assert not result.transferred and result.decode_body is client


def test_direct_content_keeps_the_bytes_unless_the_client_sent_params() -> None:
    raw = b'{"model":"m","prompt":"hi"}'
    assert NixlConnector().direct_content(raw) is raw
    stripped = NixlConnector().direct_content(b'{"prompt":"hi","kv_transfer_params":{"a":1}}')
    assert json.loads(stripped) == {"prompt": "hi"}
    with pytest.raises(BadRequestError):
        NixlConnector().direct_content(b"[1]")


def test_an_unknown_connector_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of: nixl"):
        SidecarSettings(decode_url="http://x:1", allowed_prefillers=frozenset(), connector="x")
