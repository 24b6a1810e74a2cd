"""The NIXL protocol (vLLM's ``NixlConnector``): one client request becomes a prefill and a decode one.

    client body ──┬──▶ prefill body: max_tokens=1 (and max_completion_tokens=1 if present), n=1,
                  │    stream=false, no stream_options, kv_transfer_params = "please keep the KV
                  │    blocks for a remote decoder"  ──▶ prefill worker
                  │                                         │ response.kv_transfer_params
                  │                                         ▼ (engine id, block ids, host, port)
                  └──▶ decode body: the client's body unchanged, plus those kv_transfer_params
                       ──▶ local decode worker, which pulls the blocks over NIXL and streams back

A ``kv_transfer_params`` sent by a client is always dropped: it would let anyone aim the decode
worker's NIXL pull at an arbitrary host.

Both bodies are shallow copies with only the changed keys replaced: the nested values (messages,
prompt, tools) are shared with the client's body, never mutated, and only serialised. No
``copy.deepcopy`` per disaggregated request.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from pd_runtime.common.asgi import encode_json
from pd_runtime.common.body import parse_json_body
from pd_runtime.sidecar.connectors.base import Connector, Disaggregated, PrefillCall

__all__ = [
    "REMOTE_DECODE_REQUEST",
    "NixlConnector",
    "build_decode_request",
    "build_prefill_request",
    "strip_client_transfer_params",
]

logger = logging.getLogger("pd_runtime.sidecar")

#: What a prefill worker needs to hear to keep the blocks for a remote decoder (vLLM NixlConnector).
REMOTE_DECODE_REQUEST: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def strip_client_transfer_params(body: dict[str, Any]) -> dict[str, Any]:
    """The body without any client-supplied ``kv_transfer_params`` (a shallow copy if changed)."""
    if "kv_transfer_params" not in body:
        return body
    return {k: v for k, v in body.items() if k != "kv_transfer_params"}


#: Keys the prefill body leaves out: the client's transfer params, the stream's options, and
#: ``min_tokens`` (must not exceed ``max_tokens``).
_PREFILL_DROP = frozenset({"kv_transfer_params", "stream_options", "min_tokens"})


def build_prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The one-token, non-streaming copy of ``body`` that makes the prefill worker compute the KV
    (a new top-level dict; nested values shared with ``body``, which is not changed)."""
    prefill = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    prefill["max_tokens"] = 1
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill["stream"] = False
    prefill["n"] = 1
    prefill["kv_transfer_params"] = dict(REMOTE_DECODE_REQUEST)
    return prefill


def build_decode_request(
    body: dict[str, Any], kv_transfer_params: dict[str, Any] | None
) -> dict[str, Any]:
    """The client's request for the decode worker; without params it simply prefills locally."""
    decode = strip_client_transfer_params(body)
    if kv_transfer_params:
        decode = {**decode, "kv_transfer_params": kv_transfer_params}
    return decode


class _Probe(msgspec.Struct):
    """The one top-level key the sidecar must see in a body it forwards unchanged."""

    kv_transfer_params: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_decode_probe = msgspec.json.Decoder(_Probe).decode


class NixlConnector(Connector):
    """Prefill first (one token, KV kept for a remote decoder), then decode with the prefill
    worker's ``kv_transfer_params``: the decode worker pulls the blocks over NIXL."""

    name = "nixl"

    def direct_content(self, raw_body: bytes) -> bytes:
        # msgspec checks the body is a JSON object and looks for a top-level kv_transfer_params
        # without building Python objects for the rest; without one (the usual case) the body
        # goes on exactly as received.
        try:
            probe = _decode_probe(raw_body)
        except (ValueError, RecursionError):
            probe = None  # parse_json_body below says why in the OpenAI shape
        if probe is not None and probe.kv_transfer_params is msgspec.UNSET:
            return raw_body
        return encode_json(strip_client_transfer_params(parse_json_body(raw_body)))

    async def disaggregate(self, body: dict[str, Any], prefill: PrefillCall) -> Disaggregated:
        answer = await prefill(build_prefill_request(body))
        params = answer.get("kv_transfer_params") if answer is not None else None
        if answer is not None and not params:
            logger.warning("prefill returned no kv_transfer_params; decoding locally")
        return Disaggregated(build_decode_request(body, params or None), bool(params))
