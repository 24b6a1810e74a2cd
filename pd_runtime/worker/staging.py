"""KV staging, the parts that need no vLLM: settings, the staging-buffer allocator, the kernels'
view of a worker's cache, and what a staged request tells its decode worker.

Why staging: vLLM's NixlConnector moves a request's KV as one NIXL descriptor per (layer, block)
(per head range too, with heterogeneous TP), so the descriptor count, not the bytes, sets the
transfer time once blocks are small. With staging the prefill worker packs a finished request's
blocks into one contiguous slot of a registered buffer (``pd_kernels.kv_pack``), the decode worker
moves that slot with one READ and unpacks it into its own blocks (``pd_kernels.kv_unpack``). The
vLLM side is :mod:`pd_runtime.worker.staging_connector`.

The slot is sized in *blocks* (``bytes_per_block`` = every layer's K and V of one block), so the
prefill's scheduler, which knows block counts but not addresses, can allocate it, and each worker
turns block offsets into bytes from its own cache.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch
from pd_kernels import KVLayout, Order, packed_shape

from pd_runtime.worker.command import STAGING_KEY


@dataclass(frozen=True, slots=True)
class StagingSettings:
    """``kv_connector_extra_config["pd_staging"]``; its presence turns staging on."""

    buffer_mib: int = 256
    #: Prefill side: pack each slot as this many head ranges, one per decode rank reading from
    #: this rank (decode TP / prefill TP), so that each reads its range as one descriptor.
    reader_splits: int = 1
    #: Stage only while one per-block descriptor (one layer's K and V of one block, or one head
    #: range of it) is smaller than this: larger descriptors already keep the link busy.
    max_descriptor_bytes: int = 64 * 1024
    #: Prefill side: give a packed request's blocks back to the pool at once (the slot holds its
    #: KV). Only where every decode reading from this worker reads whole slots (stages, with a
    #: TP that reader_splits was computed for): a plain NixlConnector decode would read the
    #: freed blocks. The launcher sets it where that holds.
    release_blocks: bool = False

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> StagingSettings | None:
        raw = (extra or {}).get(STAGING_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"kv_connector_extra_config.{STAGING_KEY} must be a mapping")
        settings = cls(**raw)
        if (
            settings.buffer_mib < 1
            or settings.max_descriptor_bytes < 0
            or settings.reader_splits < 1
        ):
            raise ValueError(
                f"{STAGING_KEY}: buffer_mib >= 1, reader_splits >= 1, max_descriptor_bytes >= 0"
            )
        return settings

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_mib << 20


class BlockRing:
    """First-fit allocator of contiguous block ranges in a staging buffer of ``capacity`` blocks.

    Slots are freed in any order (decode workers read at their own pace), hence first fit over
    the sorted used ranges rather than a FIFO ring; the number of slots in flight is small.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = []  # sorted offsets of used ranges
        self._sizes: dict[int, int] = {}

    def alloc(self, blocks: int) -> int | None:
        """The offset of a free range of ``blocks`` blocks (marked used), or None when none fits."""
        if blocks <= 0 or blocks > self.capacity:
            return None
        cursor = 0
        for i, start in enumerate(self._starts):
            if start - cursor >= blocks:
                return self._take(i, cursor, blocks)
            cursor = start + self._sizes[start]
        if self.capacity - cursor >= blocks:
            return self._take(len(self._starts), cursor, blocks)
        return None

    def _take(self, index: int, offset: int, blocks: int) -> int:
        self._starts.insert(index, offset)
        self._sizes[offset] = blocks
        return offset

    def free(self, offset: int) -> None:
        del self._sizes[offset]
        self._starts.pop(bisect.bisect_left(self._starts, offset))

    @property
    def used(self) -> int:
        return sum(self._sizes.values())


@dataclass(frozen=True, slots=True)
class CacheView:
    """A worker's layer caches as the kernels read them, and what one staged block costs."""

    caches: tuple[torch.Tensor, ...]  # per layer, in the kernels' 5-D shape (views, no copy)
    layout: KVLayout
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Every layer's K and V of one block: one block's share of a packed slot."""
        return len(self.caches) * 2 * self.layout.block_numel * self.dtype.itemsize

    @property
    def descriptor_bytes(self) -> int:
        """What one of vLLM's per-block descriptors moves (one layer's K and V of one block)."""
        return 2 * self.layout.block_numel * self.dtype.itemsize

    def signature(self, splits: int = 1) -> str:
        """What one reader's region of a slot packed with ``splits`` holds; a prefill's regions
        must read as the decode's own (``splits=1``) cache for a slot to mean the same thing."""
        lay = self.layout
        return (
            f"L{len(self.caches)}-B{lay.block_size}-H{lay.num_heads // splits}-D{lay.head_dim}-"
            f"{lay.order}-{str(self.dtype).removeprefix('torch.')}"
        )

    def slot(
        self, buffer: torch.Tensor, offset_blocks: int, blocks: int, splits: int = 1
    ) -> torch.Tensor:
        """The packed view ``(splits, layers, 2, blocks, heads / splits, block_size, head_dim)``
        of a slot (see ``pd_kernels.layout``); ``[s]`` is reader ``s``'s contiguous region."""
        start = offset_blocks * self.bytes_per_block
        raw = buffer[start : start + blocks * self.bytes_per_block]
        shape = packed_shape(len(self.caches), blocks, self.layout, splits)
        return raw.view(self.dtype).view(shape)


def cache_view(caches: list[torch.Tensor], kv_cache_layout: str) -> CacheView | None:
    """The kernels' view of vLLM's per-layer caches, or None for a layout staging does not know.

    * vLLM-CPU: ``(num_blocks, num_heads, block_size, 2 * head_dim)``, K and V side by side in
      the last dimension; viewed as ``(2, num_blocks, num_heads, block_size, head_dim)`` (HND).
      Which half is K does not matter: both workers copy the same bits through the same view.
    * FlashAttention-style ``(2, num_blocks, ...)`` in vLLM's ``NHD`` or ``HND`` layout.
    """
    first = caches[0]
    if any(c.shape != first.shape or c.dtype != first.dtype for c in caches):
        return None
    if first.dim() == 4 and first.shape[3] % 2 == 0:
        n, h, b, d2 = first.shape
        views = tuple(c.view(n, h, b, 2, d2 // 2).permute(3, 0, 1, 2, 4) for c in caches)
        return CacheView(views, KVLayout(n, b, h, d2 // 2, order="HND"), first.dtype)
    order = _ORDERS.get(kv_cache_layout)
    if first.dim() == 5 and first.shape[0] == 2 and order is not None:
        _, n, x, y, d = first.shape
        b, h = (x, y) if order == "NHD" else (y, x)
        return CacheView(tuple(caches), KVLayout(n, b, h, d, order=order), first.dtype)
    return None


# vLLM 0.32 names the physical order of a block as KVCacheLayout members (tokens before heads:
# LBNHC; heads before tokens: LBHNC); earlier versions said NHD / HND.
_ORDERS: dict[str, Order] = {"NHD": "NHD", "LBNHC": "NHD", "HND": "HND", "LBHNC": "HND"}


def refusal(view: CacheView | None, num_groups: int, settings: StagingSettings) -> str | None:
    """Why a worker with these caches should not stage (vLLM's per-block path instead), or None.

    Staging trades two copies (pack, unpack) for fewer descriptors; once one per-block
    descriptor is large (big blocks, many heads per rank) NIXL already streams at link speed and
    the copies are pure cost, hence the threshold.
    """
    if view is None or num_groups != 1:
        return "this KV cache layout (not a single group of a known shape)"
    if view.descriptor_bytes >= settings.max_descriptor_bytes:
        return (
            f"per-block descriptors of {view.descriptor_bytes} B are not smaller than "
            f"max_descriptor_bytes={settings.max_descriptor_bytes}"
        )
    if view.layout.num_heads % settings.reader_splits:
        return f"{view.layout.num_heads} KV heads do not split into {settings.reader_splits}"
    if settings.buffer_bytes < view.bytes_per_block:
        return f"a {settings.buffer_mib} MiB buffer holds no block of {view.bytes_per_block} B"
    return None


@dataclass(frozen=True, slots=True)
class StagedSlot:
    """What a staged request's ``kv_transfer_params["pd_staging"]`` carries to the decode worker.

    ``ranks[r]`` is prefill TP rank ``r``'s staging buffer: ``(address, device id)``; the slot
    holds ``splits`` contiguous regions, one per decode rank reading from that prefill rank. The
    params travel as JSON through the sidecar, hence lists, not tuples or int-keyed maps.
    ``released``: the prefill freed the request's blocks once packed, so only the slot holds its
    KV (a decode that cannot read the slot must recompute, never read those blocks).
    """

    ranks: tuple[tuple[int, int], ...]
    offset_blocks: int
    num_blocks: int
    signature: str
    splits: int = 1
    released: bool = False

    def to_params(self) -> dict[str, Any]:
        return {
            "ranks": [list(r) for r in self.ranks],
            "offset_blocks": self.offset_blocks,
            "num_blocks": self.num_blocks,
            "signature": self.signature,
            "splits": self.splits,
            "released": self.released,
        }

    @classmethod
    def from_params(cls, params: Any) -> StagedSlot | None:
        """None for anything malformed: the decode worker then reads per block, as vLLM does."""
        try:
            return cls(
                ranks=tuple((int(a), int(d)) for a, d in params["ranks"]),
                offset_blocks=int(params["offset_blocks"]),
                num_blocks=int(params["num_blocks"]),
                signature=str(params["signature"]),
                splits=int(params.get("splits", 1)),
                released=params.get("released", False) is True,
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


def after_refusal(params: Any, reason: str, capacity_blocks: int) -> str:
    """What a decode worker does with a request whose staged slot it could not read now
    (``reason``, a key of ``staging_stats.FALLBACK_REASONS``; ``capacity_blocks``: its buffer).

    ``"wait"``: read it at a later step (the buffer is full now and the prefill kept only the
    slot); ``"per-block"``: read the prefill's blocks as vLLM does (the prefill still holds
    them); ``"recompute"``: fail the transfer, so vLLM recomputes the prompt here. Params that
    do not parse count as released: a decode must never read blocks the prefill may have reused.
    """
    slot = StagedSlot.from_params(params)
    if slot is not None and not slot.released:
        return "per-block"
    if reason == "decode-buffer-full" and slot is not None and slot.num_blocks <= capacity_blocks:
        return "wait"
    return "recompute"
