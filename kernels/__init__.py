"""pd-runtime's KV-transfer kernels (import name ``pd_kernels``; the folder is ``kernels/``).

Pack a request's KV blocks into one contiguous buffer per reader rank, unpack (and merge, and
relayout) on the other side, or relayout received blocks in place: see :mod:`pd_kernels.layout`
for the shapes. Each function runs the Triton kernel on CUDA tensors and the pure-torch reference
(:mod:`pd_kernels.reference`) elsewhere; ``backend=`` forces one (the tests run the Triton
kernels on CPU tensors under ``TRITON_INTERPRET=1``). Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from . import reference
from .layout import KVLayout, Order, as_bits, packed_shape

__all__ = [
    "Backend",
    "KVLayout",
    "Order",
    "as_bits",
    "kv_pack",
    "kv_relayout",
    "kv_unpack",
    "packed_shape",
]

Backend = Literal["triton", "torch"]


def _impl(device: torch.device, backend: Backend | None) -> Any:
    if backend == "torch" or (backend is None and device.type != "cuda"):
        return reference
    # Imported on first use: a CPU-only install (vLLM-CPU workers) needs no working Triton.
    from . import triton_kv

    return triton_kv


def kv_pack(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    splits: int = 1,
    out: torch.Tensor | None = None,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Gather ``block_ids`` (all layers, K and V) into ``packed_shape(len(caches), n, layout,
    splits)``; ``result[s]`` is reader rank ``s``'s contiguous region."""
    impl = _impl(caches[0].device, backend)
    return impl.kv_pack(caches, layout, block_ids, splits, out)


def kv_unpack(
    buffers: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    dst_block_ids: torch.Tensor,
    *,
    backend: Backend | None = None,
) -> None:
    """Scatter the regions of ``len(buffers)`` writer ranks into the caches (see reference)."""
    _impl(caches[0].device, backend).kv_unpack(buffers, caches, layout, dst_block_ids)


def kv_relayout(
    caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    src_order: Order,
    *,
    backend: Backend | None = None,
) -> None:
    """Rewrite blocks that arrived in ``src_order`` into ``layout.order``, in place."""
    _impl(caches[0].device, backend).kv_relayout(caches, layout, block_ids, src_order)
