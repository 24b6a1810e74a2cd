"""KV staging without vLLM: the slot allocator, the kernels' view of vLLM's caches (a pack on one
worker's caches and an unpack into another's must reproduce the blocks bit for bit), and the
params a staged request carries."""

from __future__ import annotations

import random

import pytest
import torch
from pd_kernels import kv_pack, kv_unpack

from pd_runtime.worker.staging import (
    BlockRing,
    StagedSlot,
    StagingSettings,
    after_refusal,
    cache_view,
    refusal,
)


def test_ring_first_fit_reuses_freed_ranges_in_any_order() -> None:
    ring = BlockRing(10)
    a, b, c = ring.alloc(4), ring.alloc(3), ring.alloc(3)
    assert (a, b, c) == (0, 4, 7)
    assert ring.alloc(1) is None  # full
    ring.free(4)
    assert ring.alloc(4) is None  # the hole is 3 blocks
    assert ring.alloc(2) == 4
    ring.free(0)
    ring.free(7)
    assert ring.alloc(4) == 0
    assert ring.alloc(3) == 6  # right after the 2-block range at 4
    assert ring.used == 9
    assert ring.alloc(0) is None and ring.alloc(11) is None


def test_ring_never_hands_out_overlapping_ranges() -> None:
    rng = random.Random(3)
    ring = BlockRing(64)
    held: dict[int, int] = {}
    for _ in range(2000):
        if held and rng.random() < 0.45:
            offset = rng.choice(list(held))
            ring.free(offset)
            del held[offset]
            continue
        size = rng.randint(1, 12)
        offset = ring.alloc(size)
        taken = {i for o, s in held.items() for i in range(o, o + s)}
        if offset is None:
            # First fit refuses only when no hole of that size exists.
            free = [i for i in range(64) if i not in taken]
            runs = [sum(1 for _ in g) for g in _runs(free)]
            assert max(runs, default=0) < size
            continue
        assert offset >= 0 and offset + size <= 64
        assert not taken & set(range(offset, offset + size))
        held[offset] = size
        assert ring.used == sum(held.values())


def _runs(values: list[int]) -> list[range]:
    runs: list[range] = []
    for v in values:
        if runs and runs[-1].stop == v:
            runs[-1] = range(runs[-1].start, v + 1)
        else:
            runs.append(range(v, v + 1))
    return runs


def _cpu_caches(layers: int, blocks: int, seed: int) -> list[torch.Tensor]:
    """vLLM-CPU's per-layer cache: (num_blocks, num_kv_heads, block_size, 2 * head_dim)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(blocks, 2, 32, 128, generator=g).to(torch.bfloat16) for _ in range(layers)]


@pytest.mark.parametrize("decode_hit", [0, 2])
def test_pack_on_one_cpu_cache_unpack_into_another_moves_exactly_the_blocks(
    decode_hit: int,
) -> None:
    prefill, decode = _cpu_caches(4, 40, 1), _cpu_caches(4, 50, 2)
    before = [c.clone() for c in decode]
    src_view, dst_view = cache_view(prefill, "NHD"), cache_view(decode, "NHD")
    assert src_view is not None and dst_view is not None
    assert src_view.signature() == dst_view.signature() == "L4-B32-H2-D64-HND-bfloat16"
    assert src_view.bytes_per_block == 4 * 2 * 32 * 128 * 2
    src_ids = [17, 3, 29, 8, 11]
    # The decode already holds the first `decode_hit` blocks (its prefix cache): only the rest
    # get destinations, as vLLM's per-block path would read only those.
    dst_ids = [44, 0, 21, 9, 30][decode_hit:]
    buffer = torch.empty(16 * src_view.bytes_per_block, dtype=torch.uint8)
    slot = src_view.slot(buffer, 3, len(src_ids))
    kv_pack(src_view.caches, src_view.layout, torch.tensor(src_ids), out=slot)
    received = buffer.clone()  # what one READ of the whole buffer would deliver
    packed = dst_view.slot(received, 3, len(src_ids))[0][:, :, decode_hit:]
    kv_unpack([packed], dst_view.caches, dst_view.layout, torch.tensor(dst_ids))
    for layer in range(4):
        for s, d in zip(src_ids[decode_hit:], dst_ids, strict=True):
            assert torch.equal(
                decode[layer][d].view(torch.int16), prefill[layer][s].view(torch.int16)
            )
        untouched = [b for b in range(50) if b not in dst_ids]
        assert torch.equal(decode[layer][untouched], before[layer][untouched])


def test_flash_attention_layouts_are_viewed_and_unknown_ones_refused() -> None:
    hnd = [torch.zeros(2, 10, 8, 16, 64, dtype=torch.float16)]  # (2, N, H, B, D)
    view = cache_view(hnd, "HND")
    assert view is not None
    assert (view.layout.num_heads, view.layout.block_size) == (8, 16)
    nhd = cache_view([torch.zeros(2, 10, 16, 8, 64, dtype=torch.float16)], "NHD")
    assert nhd is not None and nhd.layout.block_size == 16
    assert cache_view([torch.zeros(10, 2, 16, 8, 64)], "NHD") is None  # FlashInfer: not yet
    assert cache_view([torch.zeros(10, 16, 8, 64), torch.zeros(10, 16, 8, 32)], "NHD") is None


def test_settings_come_from_the_connector_extra_config() -> None:
    assert StagingSettings.from_extra_config({"num_threads": 2}) is None
    s = StagingSettings.from_extra_config({"pd_staging": {"buffer_mib": 8}})
    assert s == StagingSettings(buffer_mib=8) and s.buffer_bytes == 8 << 20
    with pytest.raises(TypeError):
        StagingSettings.from_extra_config({"pd_staging": {"buffer_mb": 8}})
    with pytest.raises(ValueError):
        StagingSettings.from_extra_config({"pd_staging": {"buffer_mib": 0}})


def test_a_staged_slot_survives_json_and_malformed_params_are_refused() -> None:
    import json

    slot = StagedSlot(
        ((140000, 0), (150000, 1)), 12, 5, "L4-B32-H1-D64-HND-bfloat16", splits=2, released=True
    )
    assert StagedSlot.from_params(json.loads(json.dumps(slot.to_params()))) == slot
    assert StagedSlot.from_params({"ranks": [[1, 0]], "offset_blocks": 0}) is None
    assert StagedSlot.from_params("nonsense") is None
    # A prefill that holds its blocks until the read says nothing: the decode may read them.
    unreleased = {k: v for k, v in slot.to_params().items() if k != "released"}
    assert StagedSlot.from_params(unreleased) == StagedSlot(
        ((140000, 0), (150000, 1)), 12, 5, "L4-B32-H1-D64-HND-bfloat16", splits=2
    )


def test_staging_is_refused_where_descriptors_are_already_large_or_the_layout_unknown() -> None:
    view = cache_view(_cpu_caches(2, 8, 0), "NHD")  # 16 KiB per block and layer
    assert view is not None and view.descriptor_bytes == 16384
    assert refusal(view, 1, StagingSettings(max_descriptor_bytes=65536)) is None
    assert "not smaller than" in str(refusal(view, 1, StagingSettings(max_descriptor_bytes=16384)))
    assert "single group" in str(refusal(view, 2, StagingSettings()))
    assert "single group" in str(refusal(None, 1, StagingSettings()))
    big = cache_view([torch.zeros(4, 64, 256, 256, dtype=torch.bfloat16)], "NHD")  # 8 MiB blocks
    assert "holds no block" in str(
        refusal(big, 1, StagingSettings(buffer_mib=4, max_descriptor_bytes=1 << 30))
    )


def test_heterogeneous_tp_each_decode_rank_unpacks_its_heads_from_its_region() -> None:
    """Prefill TP1 (2 KV heads) packs two regions; decode ranks 0 and 1 of TP2 (1 head each)
    each take region rank % 2, as PdStagingConnector's decode side reads it."""
    prefill = _cpu_caches(3, 20, 4)  # (blocks, 2 heads, 32, 2 * 64)
    ranks = [
        [torch.zeros(30, 1, 32, 128, dtype=torch.bfloat16) for _ in range(3)] for _ in range(2)
    ]
    src = cache_view(prefill, "LBHNC")
    assert src is not None
    views = [cache_view(r, "LBHNC") for r in ranks]
    assert all(v is not None and v.signature() == src.signature(2) for v in views)
    assert src.signature(2) != src.signature()
    src_ids, dst_ids = [5, 17, 2], [[9, 0, 29], [3, 4, 5]]
    buffer = torch.empty(8 * src.bytes_per_block, dtype=torch.uint8)
    kv_pack(src.caches, src.layout, torch.tensor(src_ids), 2, out=src.slot(buffer, 1, 3, 2))
    for rank, view in enumerate(views):
        assert view is not None
        # Rank r's region, where the decode computes it: slot start + r * (blocks * its bytes).
        start = 1 * src.bytes_per_block + rank * 3 * view.bytes_per_block
        region = buffer[start : start + 3 * view.bytes_per_block]
        assert region.numel() * 2 == 3 * src.bytes_per_block
        packed = view.slot(region.clone(), 0, 3)[0]
        kv_unpack([packed], view.caches, view.layout, torch.tensor(dst_ids[rank]))
        for layer in range(3):
            for s, d in zip(src_ids, dst_ids[rank], strict=True):
                want = prefill[layer][s, rank].view(torch.int16)
                assert torch.equal(ranks[rank][layer][d, 0].view(torch.int16), want)


def test_reader_splits_must_divide_the_heads() -> None:
    view = cache_view(_cpu_caches(1, 4, 0), "LBHNC")  # 2 heads
    assert refusal(view, 1, StagingSettings(reader_splits=2)) is None
    assert "do not split" in str(refusal(view, 1, StagingSettings(reader_splits=4)))


def test_a_decode_never_reads_blocks_the_prefill_gave_back() -> None:
    held = StagedSlot(((1, 0),), 0, 8, "sig").to_params()  # a prefill that kept its blocks
    released = StagedSlot(((1, 0),), 0, 8, "sig", released=True).to_params()
    for reason in ("off-here", "layout", "topology", "decode-buffer-full"):
        assert after_refusal(held, reason, capacity_blocks=64) == "per-block"
    # Only the slot has the KV: wait for room if it can ever fit, else recompute.
    assert after_refusal(released, "decode-buffer-full", capacity_blocks=8) == "wait"
    assert after_refusal(released, "decode-buffer-full", capacity_blocks=7) == "recompute"
    for reason in ("off-here", "layout", "topology"):
        assert after_refusal(released, reason, capacity_blocks=64) == "recompute"
    assert after_refusal({"released": False}, "off-here", capacity_blocks=64) == "recompute"
