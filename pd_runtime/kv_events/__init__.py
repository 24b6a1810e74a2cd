"""KV-event-driven prefix-cache index: decode vLLM's ZMQ KV events, index blocks per endpoint.

``events`` decodes the wire format, ``keys`` computes seed-independent block keys, ``index`` holds
which endpoint has which blocks, ``subscriber`` feeds the index from each engine's PUB socket.
"""

from __future__ import annotations

from pd_runtime.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KVEventBatch,
    KVEventMessage,
    decode_batch,
    decode_message,
)
from pd_runtime.kv_events.index import IndexIntegrityError, IndexStats, PrefixIndex
from pd_runtime.kv_events.keys import ROOT_KEY, BlockKey, chain_keys
from pd_runtime.kv_events.manager import KVEventsManager
from pd_runtime.kv_events.subscriber import EventSubscriber, SubscriberStats

__all__ = [
    "ROOT_KEY",
    "AllBlocksCleared",
    "BlockKey",
    "BlockRemoved",
    "BlockStored",
    "EventDecodeError",
    "EventSubscriber",
    "IndexIntegrityError",
    "IndexStats",
    "KVEventBatch",
    "KVEventMessage",
    "KVEventsManager",
    "PrefixIndex",
    "SubscriberStats",
    "chain_keys",
    "decode_batch",
    "decode_message",
]
