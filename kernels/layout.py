"""The paged KV cache's layout, as the kernels see it, and the packed (wire) format.

vLLM keeps one tensor per attention layer. What differs between backends is the order of its
dimensions (all of them bit-copied by the kernels, whatever the dtype):

* vLLM-CUDA, FlashAttention (default ``NHD``): ``(2, num_blocks, block_size, num_heads, head_dim)``;
  with ``VLLM_KV_CACHE_LAYOUT=HND`` (what NIXL prefers: a head range of a block is contiguous)
  the same logical shape is stored as ``(2, num_blocks, num_heads, block_size, head_dim)``.
* vLLM-CUDA, FlashInfer: ``(num_blocks, 2, ...)`` (K/V after the block): ``kv_first=False``.
* vLLM-CPU (torch SDPA backend): ``(2, num_blocks, num_heads, block_size, head_dim)``: ``HND``.

:meth:`KVLayout.canonical` views any of them as ``(2, num_blocks, block_size, num_heads,
head_dim)`` (no copy), so the reference and the Triton kernels read strides and never care
which backend wrote the cache.

The packed buffer of one request, for ``splits`` reader ranks (heterogeneous TP: a reader rank
holds ``num_heads // splits`` heads), is contiguous per reader, so one NIXL descriptor moves it::

    packed[s, layer, kv, j, h, t, d]    s < splits, j < len(block_ids), h < num_heads // splits
           |                            t < block_size (tokens), d < head_dim
           +-- reader s reads packed[s] only: one region of L * 2 * n * (H/S) * B * D elements

Heads come before tokens in the wire (HND) so that a head range is one run of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["KVLayout", "Order", "as_bits", "packed_shape"]

Order = Literal["NHD", "HND"]

# Same-width integer dtypes: the kernels copy bits, so a bf16 NaN payload or -0.0 survives.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the integer dtype of the same width (no copy)."""
    return t if t.dtype == _BITS[t.element_size()] else t.view(_BITS[t.element_size()])


@dataclass(frozen=True, slots=True)
class KVLayout:
    """One layer's KV cache tensor: ``num_blocks`` blocks of ``block_size`` tokens, K and V."""

    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    order: Order = "NHD"
    kv_first: bool = True  # (2, num_blocks, ...) as FlashAttention; False: (num_blocks, 2, ...)

    def __post_init__(self) -> None:
        if self.order not in ("NHD", "HND"):
            raise ValueError(f"KVLayout.order must be 'NHD' or 'HND', not {self.order!r}")
        for name in ("num_blocks", "block_size", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive")

    @property
    def block_dims(self) -> tuple[int, int, int]:
        b, h, d = self.block_size, self.num_heads, self.head_dim
        return (b, h, d) if self.order == "NHD" else (h, b, d)

    @property
    def shape(self) -> tuple[int, ...]:
        """The physical shape of one layer's tensor."""
        lead = (2, self.num_blocks) if self.kv_first else (self.num_blocks, 2)
        return (*lead, *self.block_dims)

    @property
    def block_numel(self) -> int:
        return self.block_size * self.num_heads * self.head_dim

    def empty(self, num_layers: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
        """Per-layer cache tensors in this layout (uninitialized), as vLLM allocates them."""
        return [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def canonical(self, cache: torch.Tensor) -> torch.Tensor:
        """A view of one layer's tensor as ``(2, num_blocks, block_size, num_heads, head_dim)``."""
        if tuple(cache.shape) != self.shape:
            raise ValueError(f"cache shape {tuple(cache.shape)} is not {self.shape} ({self})")
        v = cache if self.kv_first else cache.transpose(0, 1)
        return v if self.order == "NHD" else v.transpose(2, 3)


def packed_shape(
    num_layers: int, num_blocks: int, layout: KVLayout, splits: int = 1
) -> tuple[int, ...]:
    """``(splits, layers, 2, blocks, heads // splits, block_size, head_dim)``: see the module doc."""
    if splits <= 0 or layout.num_heads % splits:
        raise ValueError(f"splits={splits} must divide num_heads={layout.num_heads}")
    return (
        splits,
        num_layers,
        2,
        num_blocks,
        layout.num_heads // splits,
        layout.block_size,
        layout.head_dim,
    )
