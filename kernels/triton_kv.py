"""The Triton kernels and their launch wrappers (same contracts as :mod:`pd_kernels.reference`).

All three are persistent copy loops over *work items* (one block of one layer, K or V, and one
head range); one launch covers every layer:

* per-layer caches are separate allocations in vLLM, so the kernels take a *pointer table* (an
  int64 tensor of ``data_ptr()``\\ s, one per layer or per writer) and cast the entry to a typed
  pointer; the wrappers check that each is 16-byte aligned and the kernels say so with
  ``tl.multiple_of``, so loads along ``head_dim`` (contiguous) vectorize;
* the grid is ``min(work items, max_ctas)`` and each program strides over the work: a KV copy
  running beside a prefill takes at most ``max_ctas`` SMs (default: a quarter of the device's);
* elements are copied as same-width integers (:func:`as_bits`): bit-exact for any dtype.

A work item copies a ``(heads, tokens, head_dim)`` tile between two strided places
(:func:`_copy_tile`); only the offsets differ between pack and unpack.
"""

# The @triton.jit functions take Triton values, which have no Python annotations:
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .layout import KVLayout, Order, as_bits
from .reference import prepare_pack, prepare_relayout, prepare_unpack

__all__ = ["default_max_ctas", "kv_pack", "kv_relayout", "kv_unpack"]

ALIGN = 16  # bytes: what the kernels promise Triton about every table entry


def default_max_ctas(device: torch.device) -> int:
    """A quarter of the SMs on CUDA (leave the rest to a concurrent prefill); 4 elsewhere
    (the CPU interpreter runs programs one after another)."""
    if device.type == "cuda":
        return max(1, torch.cuda.get_device_properties(device).multi_processor_count // 4)
    return 4


def _table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    ptrs = [t.data_ptr() for t in tensors]
    if any(p % ALIGN for p in ptrs):
        raise ValueError(f"kernel pointer tables need {ALIGN}-byte aligned tensors")
    return torch.tensor(ptrs, dtype=torch.int64, device=tensors[0].device)


def _grid(work: int, max_ctas: int | None, device: torch.device) -> tuple[int]:
    return (max(1, min(work, max_ctas or default_max_ctas(device))),)


@triton.jit
def _ptr(table, i, ELEM: tl.constexpr):
    """Entry ``i`` of a pointer table as a pointer to ``ELEM``, 16-byte aligned."""
    p = tl.load(table + i).to(tl.pointer_type(ELEM))
    return tl.multiple_of(p, 16)


@triton.jit
def _copy_tile(
    src, dst, s_h, s_t, d_h, d_t, NH, NT, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """dst[h * d_h + t * d_t + d] = src[h * s_h + t * s_t + d] for h < NH, t < NT, d < D."""
    cols = tl.max_contiguous(tl.arange(0, BLOCK_D), BLOCK_D)
    for r0 in range(0, NH * NT, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        h = (rows // NT).to(tl.int64)
        t = (rows % NT).to(tl.int64)
        mask = (rows < NH * NT)[:, None] & (cols < D)[None, :]
        x = tl.load(src + (h * s_h + t * s_t)[:, None] + cols[None, :], mask=mask)
        tl.store(dst + (h * d_h + t * d_t)[:, None] + cols[None, :], x, mask=mask)


@triton.jit
def _pack_kernel(
    cache_tbl, out, ids, L, n, S, HS, B, D, s_kv, s_blk, s_t, s_h,
    ELEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # work item w -> (layer, kv, j, s): block ids[j] of one layer's K or V, reader s's heads
    tile = HS * B * D
    for w32 in range(tl.program_id(0), L * 2 * n * S, tl.num_programs(0)):
        w = tl.cast(w32, tl.int64)  # int64 offsets: a layer can pass 2^31 elements
        s = w % S
        item = w // S  # (layer * 2 + kv) * n + j
        j = item % n
        kv = (item // n) % 2
        layer = item // (2 * n)
        src = _ptr(cache_tbl, layer, ELEM) + kv * s_kv + tl.load(ids + j) * s_blk + s * HS * s_h
        dst = out + (s * L * 2 * n + item) * tile
        _copy_tile(src, dst, s_h, s_t, B * D, D, HS, B, D, BLOCK_R, BLOCK_D)


@triton.jit
def _unpack_kernel(
    buf_tbl, cache_tbl, ids, L, n, W, HW, BS, R, D, s_kv, s_blk, s_t, s_h,
    ELEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # work item w -> (layer, kv, j, writer): source block j lands in ids[j // R] at (j % R) * BS
    tile = HW * BS * D
    for w32 in range(tl.program_id(0), L * 2 * n * W, tl.num_programs(0)):
        w = tl.cast(w32, tl.int64)  # int64 offsets: a layer can pass 2^31 elements
        wr = w % W
        item = w // W
        j = item % n
        kv = (item // n) % 2
        layer = item // (2 * n)
        cache = _ptr(cache_tbl, layer, ELEM)
        src = _ptr(buf_tbl, wr, ELEM) + item * tile
        dst = cache + kv * s_kv + tl.load(ids + j // R) * s_blk + (j % R) * BS * s_t + wr * HW * s_h
        _copy_tile(src, dst, BS * D, D, s_h, s_t, HW, BS, D, BLOCK_R, BLOCK_D)


@triton.jit
def _relayout_kernel(
    cache_tbl, ids, L, n, X, Y, D, s_kv, s_blk,
    ELEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # work item w -> (layer, kv, j): block ids[j], stored as (X, Y, D), rewritten as (Y, X, D).
    # In place: the whole block is loaded before the first store, so BLOCK_R >= X * Y.
    rows = tl.arange(0, BLOCK_R)
    cols = tl.max_contiguous(tl.arange(0, BLOCK_D), BLOCK_D)
    a = (rows // Y).to(tl.int64)
    b = (rows % Y).to(tl.int64)
    mask = (rows < X * Y)[:, None] & (cols < D)[None, :]
    for w32 in range(tl.program_id(0), L * 2 * n, tl.num_programs(0)):
        w = tl.cast(w32, tl.int64)  # int64 offsets: a layer can pass 2^31 elements
        j = w % n
        kv = (w // n) % 2
        layer = w // (2 * n)
        blk = _ptr(cache_tbl, layer, ELEM) + kv * s_kv + tl.load(ids + j) * s_blk
        x = tl.load(blk + ((a * Y + b) * D)[:, None] + cols[None, :], mask=mask)
        tl.store(blk + ((b * X + a) * D)[:, None] + cols[None, :], x, mask=mask)


_ELEM = {torch.uint8: tl.uint8, torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64}


def _launch_args(canon: torch.Tensor) -> tuple[int, ...]:
    """(s_kv, s_blk, s_t, s_h) of a canonical (2, N, B, H, D) view, in elements."""
    if canon.stride(4) != 1:
        raise ValueError("head_dim must be the contiguous dimension of the cache")
    return canon.stride(0), canon.stride(1), canon.stride(2), canon.stride(3)


def _tiles(rows: int, d: int) -> dict[str, int]:
    block_d = triton.next_power_of_2(d)
    return {
        "BLOCK_R": max(1, min(triton.next_power_of_2(rows), 4096 // block_d)),
        "BLOCK_D": block_d,
    }


def kv_pack(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    splits: int = 1,
    out: torch.Tensor | None = None,
    max_ctas: int | None = None,
) -> torch.Tensor:
    """Triton :func:`pd_kernels.reference.kv_pack`: one launch for all layers."""
    dev = caches[0].device
    ids, out = prepare_pack(caches, layout, block_ids, splits, out)
    if not len(ids):
        return out
    bits = [as_bits(c) for c in caches]
    strides = _launch_args(layout.canonical(bits[0]))
    s, nl, _, n, hs, b, d = out.shape
    _pack_kernel[_grid(nl * 2 * n * s, max_ctas, dev)](
        _table(bits), as_bits(out), ids, nl, n, s, hs, b, d, *strides,
        ELEM=_ELEM[bits[0].dtype], **_tiles(hs * b, d),
    )  # fmt: skip
    return out


def kv_unpack(
    buffers: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    dst_block_ids: torch.Tensor,
    max_ctas: int | None = None,
) -> None:
    """Triton :func:`pd_kernels.reference.kv_unpack`: one launch for all layers and writers."""
    dev = caches[0].device
    nl, _, n, hw, bs, d = buffers[0].shape
    ids, r = prepare_unpack(buffers, caches, layout, dst_block_ids)
    if not n:
        return
    if not all(b.is_contiguous() for b in buffers):
        raise ValueError("kv_unpack needs contiguous buffers")
    bits = [as_bits(c) for c in caches]
    strides = _launch_args(layout.canonical(bits[0]))
    _unpack_kernel[_grid(nl * 2 * n * len(buffers), max_ctas, dev)](
        _table([as_bits(b) for b in buffers]), _table(bits), ids, nl, n, len(buffers), hw, bs, r,
        d, *strides, ELEM=_ELEM[bits[0].dtype], **_tiles(hw * bs, d),
    )  # fmt: skip


def kv_relayout(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    src_order: Order,
    max_ctas: int | None = None,
) -> None:
    """Triton :func:`pd_kernels.reference.kv_relayout`: one launch for all layers.

    A program holds a whole block in registers (in place), so this suits blocks up to ~16 k
    elements (16 tokens x 8 heads x 128); larger ones would want a staging buffer.
    """
    dev = caches[0].device
    ids = prepare_relayout(caches, layout, block_ids, src_order)
    if ids is None:
        return
    bits = [as_bits(c) for c in caches]
    v = bits[0] if layout.kv_first else bits[0].transpose(0, 1)
    x, y, d = layout.block_dims[1], layout.block_dims[0], layout.head_dim
    _relayout_kernel[_grid(len(bits) * 2 * len(ids), max_ctas, dev)](
        _table(bits), ids, len(bits), len(ids), x, y, d, v.stride(0), v.stride(1),
        ELEM=_ELEM[bits[0].dtype], BLOCK_R=triton.next_power_of_2(x * y),
        BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
