"""Decoding vLLM's KV event wire format, without importing vLLM.

A vLLM engine started with ``--kv-events-config '{"publisher": "zmq", ...}'`` publishes one ZMQ
multipart message per scheduler step::

    frame 0  topic      utf-8, e.g. b"kv@10.0.0.5:8000@model" (may be empty)
    frame 1  sequence   8-byte big-endian unsigned, +1 per message, starts at 0
    frame 2  payload    msgpack of KVEventBatch

    KVEventBatch  = [ts: float, events: [event, ...], data_parallel_rank: int | None]   (array)
    event         = {"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...} (map)

The batch is ``array_like`` but the events are *tagged maps* (``tag=True`` without
``array_like``), with ``omit_defaults``: optional trailing fields (``extra_keys``, ``group_idx``,
``locality``...) are absent when unset. Block hashes are ``bytes`` (sha256, the default) or
``int`` (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``); both are hashable and kept as they arrive.

``token_ids`` is kept as ``msgspec.Raw`` (a zero-copy view of its msgpack array in the payload) and
decoded by the index when it keys the blocks (:func:`decode_token_ids`). Why: token ids are ~16 of
every 17 objects in a batch (a Python int each); materialised at decode, a backlog of decoded
batches held ~450 MB per million blocks and made decoding ~5x slower than decoding the rest
(``benchmarks/results/2026-12-06-ingest``). Decoded at keying time they live for one event.

Why mirror types instead of ``vllm.distributed.kv_events``: importing that module imports
``vllm.config`` and torch (10-40 s here), which the coordinator must not pay. The mirrors use the
same tags and layout; ``tests/unit/kv_events/test_events.py`` encodes with vLLM's own classes and
decodes with these, so drift in a vLLM upgrade fails a test. Unknown fields are ignored (newer
publishers), and fields vLLM 0.32 requires but older publishers lack default to ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import msgspec

__all__ = [
    "MEDIUM_CPU",
    "MEDIUM_GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineBlockHash",
    "EventDecodeError",
    "KVEvent",
    "KVEventBatch",
    "KVEventMessage",
    "decode_batch",
    "decode_message",
    "decode_token_ids",
    "encode_token_ids",
]

#: The engine's hash of a block: sha256 bytes, or a 64-bit int; seed-dependent, never compared
#: across engines.
EngineBlockHash: TypeAlias = "bytes | int"

#: vLLM's tier names; ``medium=None`` is read as GPU (the primary block pool's default).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks became prefix-cache hits on the publisher, in ``medium``.

    ``token_ids`` covers all of ``block_hashes``: ``len(token_ids) == len(block_hashes) *
    block_size``; it is the msgpack array as received (see the module docstring; built in-process
    with :func:`encode_token_ids`). ``parent_block_hash`` is the engine hash of the block before
    the first one (``None``: the first block starts the prompt). vLLM 0.32 also re-emits this for
    blocks a request *reused*, so consumers must treat it as idempotent. Offloading connectors may
    emit placeholders (``token_ids=[]``, ``block_size=0``) that only name a hash.
    """

    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None = None
    token_ids: msgspec.Raw = msgspec.Raw(b"\x90")  # an empty msgpack array
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    #: Per block: LoRA name, (mm_identifier, offset) pairs, cache_salt... or None.
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Blocks were evicted from ``medium`` on the publisher."""

    block_hashes: list[bytes | int]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """The publisher reset its prefix cache (``/reset_prefix_cache``, weight reload...)."""


KVEvent: TypeAlias = "BlockStored | BlockRemoved | AllBlocksCleared"


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One scheduler step's events; ``ts`` is the publisher's ``time.time()`` in seconds."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class KVEventMessage(msgspec.Struct, frozen=True, gc=False):
    """A decoded multipart message: topic, sequence number and batch."""

    topic: str
    seq: int
    batch: KVEventBatch


class EventDecodeError(ValueError):
    """A message is not a KV event batch (wrong frame count, bad msgpack, unknown tag)."""


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_token_decoder = msgspec.msgpack.Decoder(list[int])
_encode = msgspec.msgpack.encode


def encode_token_ids(token_ids: Sequence[int]) -> msgspec.Raw:
    """``BlockStored.token_ids`` for an event built in-process (tests, benchmarks)."""
    return msgspec.Raw(_encode(token_ids))


def decode_token_ids(raw: msgspec.Raw) -> list[int]:
    """``BlockStored.token_ids`` as ints; raises :class:`EventDecodeError` if it is not an array
    of ints (only a decoded batch can hold such a value: :func:`decode_batch` does not check it).
    """
    try:
        return _token_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"bad token_ids: {exc}") from exc


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode frame 2; raises :class:`EventDecodeError` (chained) on malformed input."""
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"bad KV event payload: {exc}") from exc


def decode_message(frames: list[bytes]) -> KVEventMessage:
    """Decode ``[topic, seq, payload]``; raises :class:`EventDecodeError` on anything else."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise EventDecodeError(f"expected [topic, 8-byte seq, payload], got {len(frames)} frames")
    topic, seq, payload = frames
    return KVEventMessage(
        topic=topic.decode("utf-8", "replace"),
        seq=int.from_bytes(seq, "big"),
        batch=decode_batch(payload),
    )
