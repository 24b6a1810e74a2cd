"""The Triton KV kernels (under TRITON_INTERPRET=1, see conftest.py) against the torch reference,
and the reference against an element-by-element reading of the documented shapes. Caches are
filled with random *bits* (NaN payloads, -0.0, denormals included): every comparison is on the
integer view, i.e. bit-exact. Shapes are tiny: the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch
from pd_kernels import KVLayout, as_bits, kv_pack, kv_relayout, kv_unpack, packed_shape
from pd_kernels import reference as ref

DTYPES = [torch.bfloat16, torch.float16, torch.uint8]
L, N, D = 2, 12, 8  # layers, pool blocks, head_dim


def random_caches(layout: KVLayout, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    caches = layout.empty(L, dtype)
    for c in caches:
        bits = as_bits(c)
        info = torch.iinfo(bits.dtype)
        bits.copy_(torch.randint(info.min, info.max, bits.shape, generator=g, dtype=torch.int64))
    return caches


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(as_bits(x), as_bits(y)) for x, y in zip(a, b, strict=True))


def ids_of(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


UNORDERED = ids_of(7, 2, 11)


@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_triton_matches_reference(dtype: torch.dtype, order: str, splits: int) -> None:
    layout = KVLayout(N, block_size=4, num_heads=4, head_dim=D, order=order)  # type: ignore[arg-type]
    caches = random_caches(layout, dtype)
    want = kv_pack(caches, layout, UNORDERED, splits, backend="torch")
    got = kv_pack(caches, layout, UNORDERED, splits, backend="triton")
    assert got.shape == packed_shape(L, 3, layout, splits)
    assert torch.equal(as_bits(got), as_bits(want))


@pytest.mark.parametrize("kv_first", [True, False])
def test_pack_reference_reads_the_documented_shape(kv_first: bool) -> None:
    layout = KVLayout(N, block_size=4, num_heads=4, head_dim=D, order="HND", kv_first=kv_first)
    caches = random_caches(layout, torch.bfloat16)
    packed = as_bits(kv_pack(caches, layout, UNORDERED, splits=2, backend="torch"))
    got_triton = as_bits(kv_pack(caches, layout, UNORDERED, splits=2, backend="triton"))
    assert torch.equal(got_triton, packed)
    for layer, cache in enumerate(caches):
        canon = layout.canonical(as_bits(cache))  # (2, N, B, H, D)
        for s in range(2):
            for j, blk in enumerate(UNORDERED.tolist()):
                for kv in range(2):
                    want = canon[kv, blk, :, 2 * s : 2 * s + 2].transpose(0, 1)
                    assert torch.equal(packed[s, layer, kv, j], want)


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("writers", [1, 2])
@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_triton_matches_reference(
    dtype: torch.dtype, order: str, writers: int, ratio: int
) -> None:
    # 3 source blocks of 2 tokens from each writer (2 heads each) into decode blocks of 2*ratio.
    dst = KVLayout(N, block_size=2 * ratio, num_heads=2 * writers, head_dim=D, order=order)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    shape = (L, 2, 3, 2, 2, D)
    bufs = [
        torch.randint(0, 255, shape, generator=g, dtype=torch.uint8).to(dtype)
        for _ in range(writers)
    ]
    dst_ids = ids_of(9, 0) if ratio == 2 else UNORDERED
    want, got = random_caches(dst, dtype, seed=2), random_caches(dst, dtype, seed=2)
    kv_unpack(bufs, want, dst, dst_ids, backend="torch")
    kv_unpack(bufs, got, dst, dst_ids, backend="triton")
    assert same_bits(got, want)
    if ratio == 2:  # block 0 got source block 2 in its first half only; the rest is untouched
        untouched = random_caches(dst, dtype, seed=2)
        for c, u in zip(want, untouched, strict=True):
            cv, uv = dst.canonical(as_bits(c)), dst.canonical(as_bits(u))
            assert torch.equal(cv[:, 0, 2:], uv[:, 0, 2:])
            assert torch.equal(cv[:, 1:9], uv[:, 1:9])


@pytest.mark.parametrize("kv_first", [True, False])
@pytest.mark.parametrize("src_order", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relayout_triton_matches_reference(
    dtype: torch.dtype, src_order: str, kv_first: bool
) -> None:
    dst_order = "HND" if src_order == "NHD" else "NHD"
    layout = KVLayout(N, 4, 2, D, order=dst_order, kv_first=kv_first)  # type: ignore[arg-type]
    want, got = random_caches(layout, dtype), random_caches(layout, dtype)
    kv_relayout(want, layout, UNORDERED, src_order, backend="torch")  # type: ignore[arg-type]
    kv_relayout(got, layout, UNORDERED, src_order, backend="triton")  # type: ignore[arg-type]
    assert same_bits(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_relayout_turns_sent_bytes_into_the_local_layout(backend: str) -> None:
    # The sender's HND block, written byte for byte into our NHD cache, reads right afterwards.
    hnd = KVLayout(N, 4, 2, D, order="HND")
    nhd = KVLayout(N, 4, 2, D, order="NHD")
    sender = random_caches(hnd, torch.float16)
    local = random_caches(nhd, torch.float16, seed=3)
    for s, t in zip(sender, local, strict=True):
        as_bits(t)[:, UNORDERED] = as_bits(s)[:, UNORDERED].reshape(2, 3, *nhd.block_dims)
    kv_relayout(local, nhd, UNORDERED, "HND", backend=backend)  # type: ignore[arg-type]
    for s, t in zip(sender, local, strict=True):
        want = hnd.canonical(as_bits(s))[:, UNORDERED]
        assert torch.equal(nhd.canonical(as_bits(t))[:, UNORDERED], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_round_trip_heterogeneous_tp(backend: str) -> None:
    """Prefill TP1 (4 heads, blocks of 2, NHD) -> 2 decode ranks (2 heads each, blocks of 4, HND);
    and back the other way: 2 prefill ranks -> 1 decode rank (2 writers)."""
    prefill = KVLayout(N, 2, 4, D, order="NHD")
    decode = KVLayout(N, 4, 2, D, order="HND")
    caches = random_caches(prefill, torch.bfloat16)
    src_ids, dst_ids = ids_of(5, 1, 8, 3, 10), ids_of(6, 2, 0)  # 5 blocks of 2 -> 3 of 4
    packed = kv_pack(caches, prefill, src_ids, splits=2, backend=backend)  # type: ignore[arg-type]
    ranks = [random_caches(decode, torch.bfloat16, seed=4 + s) for s in range(2)]
    for s in range(2):
        kv_unpack([packed[s]], ranks[s], decode, dst_ids, backend=backend)  # type: ignore[arg-type]
    for layer, cache in enumerate(caches):
        sent = prefill.canonical(as_bits(cache))[:, src_ids]  # (2, 5, 2, 4, D)
        for s in range(2):
            got = decode.canonical(as_bits(ranks[s][layer]))[:, dst_ids].flatten(1, 2)[:, :10]
            assert torch.equal(got, sent.flatten(1, 2)[:, :, 2 * s : 2 * s + 2])
    # Back: each decode rank packs its 2 heads (split 1), one 4-head rank merges both writers.
    back = [kv_pack(r, decode, dst_ids, backend=backend)[0] for r in ranks]  # type: ignore[arg-type]
    whole = KVLayout(N, 4, 4, D, order="NHD")
    merged = random_caches(whole, torch.bfloat16, seed=9)
    kv_unpack(back, merged, whole, dst_ids, backend=backend)  # type: ignore[arg-type]
    for layer in range(L):
        got = whole.canonical(as_bits(merged[layer]))[:, dst_ids]
        for s in range(2):
            want = decode.canonical(as_bits(ranks[s][layer]))[:, dst_ids]
            assert torch.equal(got[:, :, :, 2 * s : 2 * s + 2], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_block_lists_are_no_ops(backend: str) -> None:
    layout = KVLayout(N, 4, 2, D)
    caches = random_caches(layout, torch.float16)
    before = [c.clone() for c in caches]
    none = ids_of()
    packed = kv_pack(caches, layout, none, splits=2, backend=backend)  # type: ignore[arg-type]
    assert packed.shape == (2, L, 2, 0, 1, 4, D)
    kv_unpack([packed[0], packed[1]], caches, layout, none, backend=backend)  # type: ignore[arg-type]
    kv_relayout(caches, layout, none, "HND", backend=backend)  # type: ignore[arg-type]
    assert same_bits(caches, before)


def test_bad_arguments_are_refused() -> None:
    layout = KVLayout(N, 4, 4, D)
    caches = random_caches(layout, torch.float16)
    with pytest.raises(ValueError, match="splits=3"):
        kv_pack(caches, layout, UNORDERED, splits=3)
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        kv_pack(caches, layout, ids_of(12))
    packed = kv_pack(caches, layout, UNORDERED)
    big = KVLayout(N, 8, 4, D)
    with pytest.raises(ValueError, match="need 2 dst_block_ids"):
        kv_unpack([packed[0]], big.empty(L, torch.float16), big, ids_of(1))
    with pytest.raises(ValueError, match="not a multiple"):
        kv_unpack(
            [packed[0]],
            KVLayout(N, 6, 4, D).empty(L, torch.float16),
            KVLayout(N, 6, 4, D),
            ids_of(1),
        )
    with pytest.raises(ValueError, match="order"):
        KVLayout(N, 4, 4, D, order="DHN")  # type: ignore[arg-type]
    assert ref.merge_ratio(4, big) == 2
