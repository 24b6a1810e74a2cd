"""Decode batches encoded by vLLM's own msgspec classes and encoder, so format drift fails here."""

from __future__ import annotations

import msgspec
import pytest
import vllm.distributed.kv_events as vk

from pd_runtime.kv_events import events as ours


def _vllm_batch() -> object:
    return vk.KVEventBatch(
        ts=1700000000.25,
        events=[
            vk.BlockStored(
                block_hashes=[b"\x01" * 32, b"\x02" * 32],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=2,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                group_idx=0,
            ),
            vk.BlockStored(
                block_hashes=[7],
                parent_block_hash=2**63 + 5,
                token_ids=[5, 6],
                block_size=2,
                lora_id=3,
                medium="CPU",
                lora_name="adapter",
                extra_keys=[("adapter", ("mm-1", 0))],
                group_idx=1,
                kv_cache_spec_kind="full_attention",
                kv_cache_spec_sliding_window=128,
                locality="LOCAL",
                ownership="tier2",
                session_id="s1",
            ),
            vk.BlockRemoved(block_hashes=[b"\x02" * 32, 7], medium=None, group_idx=0),
            vk.AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )


def test_same_fields_as_vllm() -> None:
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
        theirs = [f.name for f in msgspec.structs.fields(getattr(vk, name))]
        mine = [f.name for f in msgspec.structs.fields(getattr(ours, name))]
        assert mine == theirs, name
    assert [f.name for f in msgspec.structs.fields(vk.KVEventBatch)] == [
        f.name for f in msgspec.structs.fields(ours.KVEventBatch)
    ]


def test_decode_vllm_encoded_batch() -> None:
    batch = _vllm_batch()
    payload = msgspec.msgpack.Encoder().encode(batch)  # what ZmqEventPublisher sends
    got = ours.decode_batch(payload)
    assert got.ts == batch.ts and got.data_parallel_rank == 2
    assert [type(e).__name__ for e in got.events] == [type(e).__name__ for e in batch.events]
    for mine, theirs in zip(got.events, batch.events, strict=True):
        for f in msgspec.structs.fields(mine):
            # Compare as msgpack: nested tuples inside extra_keys decode as lists, which encode
            # (and so key) identically.
            enc = msgspec.msgpack.encode
            assert enc(getattr(mine, f.name)) == enc(getattr(theirs, f.name)), f.name
    stored = got.events[0]
    assert isinstance(stored, ours.BlockStored)
    assert stored.block_hashes == [b"\x01" * 32, b"\x02" * 32]  # bytes stay bytes (hashable)
    assert got.events[1].block_hashes == [7]  # type: ignore[union-attr]


def test_decode_message_frames() -> None:
    payload = msgspec.msgpack.encode(_vllm_batch())
    msg = ours.decode_message([b"kv@h:1@m", (41).to_bytes(8, "big"), payload])
    assert (msg.topic, msg.seq, len(msg.batch.events)) == ("kv@h:1@m", 41, 4)


@pytest.mark.parametrize(
    "frames",
    [
        [b"t", b"\x00" * 8],
        [b"t", b"\x00" * 4, b"\x90"],
        [b"t", b"\x00" * 8, b"\xc1garbage"],
        [b"t", b"\x00" * 8, msgspec.msgpack.encode([1.0, [{"type": "Nope"}], None])],
    ],
)
def test_malformed_messages_raise(frames: list[bytes]) -> None:
    with pytest.raises(ours.EventDecodeError):
        ours.decode_message(frames)
