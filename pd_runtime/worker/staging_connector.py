"""``PdStagingConnector``: vLLM's NixlConnector (pull mode) with a request's KV moved as one packed
slot instead of one NIXL descriptor per (layer, block). Workers load it through
``kv_connector_module_path`` (the worker command sets it when ``transport.kv_staging_mib`` is on).

Where each step happens, and why there::

    prefill scheduler   build_connector_meta: the step that completes a request's prompt gets
                        a slot (BlockRing, in blocks) and a pack order in the step's metadata
    prefill worker      wait_for_save (end of that same forward): kv_pack into the slot, so the
                        slot is full before the request can finish and its params leave
    prefill scheduler   request_finished: kv_transfer_params += pd_staging (addresses from the
                        worker's step output, offset, blocks, layout signature); the blocks go
                        back to the pool at once (the slot holds the KV)
    decode worker       _read_blocks_for_req: one READ of the slot into a local slot, with vLLM's
                        usual completion notification (the prefill frees the slot on it)
    decode worker       get_transfer_results: kv_unpack into the request's blocks before the
                        scheduler hears that they arrived

Pull, not push: the decode side already decides when it reads (after its handshake, with its
blocks allocated); a push would need the decode's slot address on the prefill before the prefill
answers. What the prefill cannot stage (a layout it does not know, several KV cache groups, no
free slot) takes vLLM's per-block path; a staged slot the decode cannot read (another layout, a
TP ratio or block size the prefill did not pack for, malformed params) is recomputed there, since
the prefill no longer holds the blocks. Each is counted by reason (:mod:`staging_stats`) and
logged the first time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from pd_kernels import kv_pack, kv_unpack
from vllm.distributed.kv_transfer.kv_connector.utils import BlockIds, yield_req_data
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlBaseConnector,
    NixlPullConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlConnectorMetadata,
    ReqMeta,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
    NixlPullConnectorWorker,
)
from vllm.logger import init_logger

from pd_runtime.worker.staging import (
    STAGING_KEY,
    BlockRing,
    CacheView,
    StagedSlot,
    StagingSettings,
    after_refusal,
    cache_view,
    refusal,
)
from pd_runtime.worker.staging_stats import StagingPromMetrics, StagingStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.pd_runtime.staging")

# Attributes this connector adds to vLLM's NixlConnectorMetadata (scheduler -> worker).
PACK_ATTR = "pd_pack"  # prefill: {req_id: (block ids, slot offset in blocks)}
RECV_ATTR = "pd_recv"  # decode: {req_id: the prefill's pd_staging params}


class StagingWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, every step: where each TP rank's staging buffer lives, and how many
    blocks it holds (the scheduler allocates slots in it without knowing addresses)."""

    def __init__(
        self, ranks: dict[int, tuple[int, int]], signature: str, capacity: int, splits: int
    ) -> None:
        self.ranks = ranks
        self.signature = signature  # of one reader's region
        self.capacity = capacity
        self.splits = splits

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, StagingWorkerMeta):
            ranks, capacity = {**self.ranks, **other.ranks}, min(self.capacity, other.capacity)
            return StagingWorkerMeta(ranks, self.signature, capacity, self.splits)
        return self


class StagingScheduler(NixlPullConnectorScheduler):
    """Allocates slots and orders packs (prefill); hands a request's slot to its worker (decode)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        engine_id: str,
        kv_cache_config: KVCacheConfig,
        settings: StagingSettings | None = None,
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self._release = settings is not None and settings.release_blocks
        # Made when the workers first say where their buffers are (never, with staging off).
        self._ring: BlockRing | None = None
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._workers: StagingWorkerMeta | None = None
        self._prompts: dict[str, tuple[Request, list[int]]] = {}  # prefills being computed
        self._packed: dict[str, tuple[int, list[int]]] = {}  # packed, request not finished
        # Staged requests: slot offset until the decode has read it (or the lease expired), and
        # whether their blocks went back at once (then vLLM's scheduler no longer knows them).
        self._held: dict[str, tuple[int, bool]] = {}
        self.stats = StagingStats()  # the prefill's fallbacks (its worker counts the packs)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        params = request.kv_transfer_params
        if params and params.get("do_remote_decode") and self._ring is not None:
            self._prompts.setdefault(request.request_id, (request, []))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> NixlConnectorMetadata:
        recv = {
            req_id: params[STAGING_KEY]
            for req_id, (request, *_) in self._reqs_need_recv.items()
            if (params := request.kv_transfer_params) and STAGING_KEY in params
        }
        meta = super().build_connector_meta(scheduler_output)
        assert isinstance(meta, NixlConnectorMetadata)
        setattr(meta, RECV_ATTR, recv)
        setattr(meta, PACK_ATTR, self._orders(scheduler_output) if self._prompts else {})
        return meta

    def _orders(self, scheduler_output: SchedulerOutput) -> dict[str, tuple[list[int], int]]:
        """Pack orders for the prompts this step completes (their blocks are all known now)."""
        orders: dict[str, tuple[list[int], int]] = {}
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id, new_block_ids, resumed in yield_req_data(scheduler_output):
            entry = self._prompts.get(req_id)
            if entry is None:
                continue
            request, block_ids = entry
            if new_block_ids is not None:
                if resumed:  # preempted and back: its blocks were freed and allocated again
                    block_ids.clear()
                block_ids.extend(new_block_ids[0])
            if request.num_computed_tokens + scheduled.get(req_id, 0) < request.num_prompt_tokens:
                continue
            del self._prompts[req_id]
            if self._ring is None or self._workers is None:
                continue
            if len(self._workers.ranks) < self._tp_size:
                # Not every rank has said where its buffer is yet: per-block this time.
                self.stats.record_fallback("prefill-not-ready")
                continue
            offset = self._ring.alloc(len(block_ids))
            if offset is None:
                self.stats.record_fallback("prefill-buffer-full")
                continue
            orders[req_id] = (list(block_ids), offset)
            self._packed[req_id] = (offset, list(block_ids))
        return orders

    def request_finished(
        self, request: Request, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        delay_free, params = super().request_finished(request, block_ids)
        req_id = request.request_id
        self._prompts.pop(req_id, None)
        packed = self._packed.pop(req_id, None)
        if packed is None:
            return delay_free, params
        offset, packed_ids = packed
        workers, ring = self._workers, self._ring
        assert ring is not None  # it packed
        if (
            delay_free
            and params is not None
            and workers is not None
            and [list(group) for group in params["remote_block_ids"]] == [packed_ids]
        ):
            self._held[req_id] = (offset, self._release)
            params[STAGING_KEY] = StagedSlot(
                ranks=tuple(workers.ranks[rank] for rank in range(self._tp_size)),
                offset_blocks=offset,
                num_blocks=len(packed_ids),
                signature=workers.signature,
                splits=workers.splits,
                released=self._release,
            ).to_params()
            # The slot holds the KV now (packed at the end of the forward that completed the
            # prompt, before this step's output): with release on, the blocks need not wait for
            # the decode's read. They go back to the pool at once (still a prefix-cache hit
            # until evicted); the worker keeps the lease and reports the read (or the expiry),
            # which frees the slot below.
            if self._release:
                return False, params
        else:  # aborted, or its blocks are not what was packed: the decode reads per block
            if delay_free and params is not None:
                self.stats.record_fallback("blocks-changed")
            ring.free(offset)
        return delay_free, params

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        super().update_connector_output(connector_output)
        workers = connector_output.kv_connector_worker_meta
        if isinstance(workers, StagingWorkerMeta):
            self._workers = workers
            if self._ring is None:
                self._ring = BlockRing(workers.capacity)
        # Read by the decode, or its lease expired: the slot is free either way. Such a request
        # is gone from vLLM's scheduler (its blocks went back when it finished), which must not
        # hear of it again.
        sent = connector_output.finished_sending
        for req_id in list(sent or ()):
            held = self._held.pop(req_id, None)
            if held is not None:
                assert sent is not None and self._ring is not None
                offset, released = held
                self._ring.free(offset)
                if released:
                    sent.discard(req_id)

    def has_pending_push_work(self) -> bool:
        # vLLM keeps an engine stepping while a finished request still holds blocks; a released
        # one holds only a slot, and only stepping polls the read's notification and the lease.
        return any(released for _, released in self._held.values())


class StagingWorker(NixlPullConnectorWorker):
    """Packs (prefill), reads one slot and unpacks it (decode); the rest is vLLM's worker."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        engine_id: str,
        kv_cache_config: KVCacheConfig,
        settings: StagingSettings | None,
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self._settings = settings
        self._view: CacheView | None = None
        self._buffer: torch.Tensor | None = None
        self._ring = BlockRing(0)
        self._recv_params: dict[str, Any] = {}
        self._staged_recv: dict[str, tuple[int, int, list[int]]] = {}  # slot, blocks, local ids
        self._waiting: dict[str, tuple[ReqMeta, Any]] = {}  # released slots, no room here yet
        self._fallbacks_logged: set[str] = set()
        # vLLM's NIXL stats, and the packs, unpacks and fallbacks (one object, two names).
        self.staging_stats = self.xfer_stats = StagingStats()

    # ---- both sides -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # The buffer is registered first, so the agent metadata vLLM publishes in its handshake
        # (fetched at the end of super().register_kv_caches) already covers it.
        self._setup_buffer(kv_caches)
        super().register_kv_caches(kv_caches)

    def _setup_buffer(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._settings is None:
            return
        view = cache_view([kv_caches[name] for name in sorted(kv_caches)], self.kv_cache_layout)
        reason = refusal(view, len(self.kv_cache_config.kv_cache_groups), self._settings)
        if reason is not None:
            logger.info("pd-runtime KV staging not used: %s; vLLM's per-block path", reason)
            return
        assert view is not None  # refusal() names a reason for a missing view
        capacity = self._settings.buffer_bytes // view.bytes_per_block
        first = view.caches[0]
        self._buffer = torch.empty(
            capacity * view.bytes_per_block, dtype=torch.uint8, device=first.device
        )
        descs = self.nixl_wrapper.get_reg_descs([self._buffer])
        self.nixl_wrapper.register_memory(descs, backends=self.nixl_backends)
        self._registered_descs.append(descs)  # vLLM deregisters these at shutdown
        self._view, self._ring = view, BlockRing(capacity)
        logger.info(
            "pd-runtime KV staging on: %d MiB buffer, %d blocks of %d B (%s); per-block "
            "descriptors of %d B; slots packed as %d head range(s)",
            self._settings.buffer_mib,
            capacity,
            view.bytes_per_block,
            view.signature(),
            view.descriptor_bytes,
            self._splits,
        )

    def _fallback(self, reason: str, detail: str, action: str = "per-block") -> None:
        """Count a request not moved as a slot (``reason``, one of FALLBACK_REASONS) and what
        happens instead (``action``: per-block or recompute); log the first of each reason."""
        self.staging_stats.record_fallback(reason)
        if reason not in self._fallbacks_logged:
            self._fallbacks_logged.add(reason)
            logger.info(
                "pd-runtime KV staging not used for a request (%s: %s): %s; counted in "
                "pd_staging_fallbacks_total, logged once per reason",
                reason,
                detail,
                "read per block" if action == "per-block" else "recomputed here",
            )

    def worker_meta(self) -> StagingWorkerMeta | None:
        if self._buffer is None or self._view is None:
            return None
        device = max(self._buffer.get_device(), 0)
        return StagingWorkerMeta(
            {self.tp_rank: (self._buffer.data_ptr(), device)},
            self._view.signature(self._splits),
            self._ring.capacity,
            self._splits,
        )

    @property
    def _splits(self) -> int:
        return self._settings.reader_splits if self._settings else 1

    # ---- prefill: pack ----------------------------------------------------------------------

    def pack(self, orders: dict[str, tuple[list[int], int]]) -> None:
        assert self._buffer is not None and self._view is not None
        view = self._view
        started = time.perf_counter()
        for block_ids, offset in orders.values():
            out = view.slot(self._buffer, offset, len(block_ids), self._splits)
            ids = torch.tensor(block_ids, dtype=torch.int64)
            kv_pack(view.caches, view.layout, ids, splits=self._splits, out=out)
        # The request's params leave once the step's sampled tokens reach the host, which on a
        # GPU can be before a pack queued after them has run: a READ must find the slot full.
        self._sync_device()
        share = (time.perf_counter() - started) / len(orders)
        for _ in orders:
            self.staging_stats.record_pack(share)

    def _sync_device(self) -> None:
        if self._buffer is not None and self._buffer.is_cuda:
            torch.cuda.current_stream(self._buffer.device).synchronize()

    # ---- decode: read one slot, unpack ------------------------------------------------------

    def start_load_kv(self, metadata: NixlConnectorMetadata) -> None:
        self._recv_params.update(getattr(metadata, RECV_ATTR, {}))
        # Reads that waited for room in the buffer (unpacks of the last step freed some).
        for req_id, (meta, params) in list(self._waiting.items()):
            del self._waiting[req_id]
            self._read_blocks_for_req(req_id, meta, params)
        super().start_load_kv(metadata)

    def _read_blocks_for_req(self, req_id: str, meta: ReqMeta, params: Any = None) -> None:
        assert meta.remote is not None
        engine_id = meta.remote.engine_id
        ready = engine_id in self._remote_agents and engine_id not in self._invalid_remote_engines
        if not ready:  # vLLM handshakes first and calls again, or fails the request
            if params is not None:  # a read that waited for room: its params wait too
                self._recv_params[req_id] = params
            super()._read_blocks_for_req(req_id, meta)
            return
        if params is None:
            params = self._recv_params.pop(req_id, None)
        local = meta.local_physical_block_ids
        if not (local and any(local)):  # a full local hit: vLLM's path only notifies
            super()._read_blocks_for_req(req_id, meta)
            return
        if params is None:  # the prefill did not pack it: its blocks are there to be read
            self._fallback("not-packed", "no pd_staging in the request's transfer params")
            super()._read_blocks_for_req(req_id, meta)
            return
        refused = self._read_staged(req_id, meta, params)
        if refused is None:
            return
        reason, detail = refused
        action = after_refusal(params, reason, self._ring.capacity)
        if action == "wait":  # each step's unpacks free room
            self._waiting[req_id] = (meta, params)
            return
        self._fallback(reason, detail, action)
        if action == "per-block":
            super()._read_blocks_for_req(req_id, meta)
            return
        # Recomputed here (vLLM's kv_load_failure_policy): not counted as a transport failure,
        # the prefill's peer stays valid, and the prefill hears that the slot will not be read.
        self._notify_unread(req_id, meta)
        self._handle_failed_transfer(
            req_id, None, self._recv_failures, record_failed_transfer=False
        )

    def _notify_unread(self, req_id: str, meta: ReqMeta) -> None:
        """Tell each source rank its slot will not be read (the completion notification vLLM
        sends after a read, or for a full local hit), so the prefill frees it now rather than
        at the lease's end."""
        assert meta.remote is not None
        engine_id = meta.remote.engine_id
        mapping = self.tp_mappings[engine_id]
        notif = f"{meta.remote.request_id}:{mapping.local_consumers}".encode()
        for source in mapping.all_source_ranks:
            agent = self._remote_agents[engine_id].get((0, source))
            if agent is None:  # no handshake with that rank: its lease frees the slot
                continue
            try:
                self.nixl_wrapper.send_notif(agent, notif_msg=notif)
            except Exception as e:  # the lease frees the slot instead
                self._log_failure(
                    failure_type="notification_failed",
                    msg="staged slot not read; the prefill frees it at its lease's end",
                    req_id=req_id,
                    error=e,
                    dst_engine_id=engine_id,
                    remote_rank=source,
                    remote_agent_name=agent,
                )
                self.xfer_stats.record_failed_notification()

    def _read_staged(self, req_id: str, meta: ReqMeta, params: Any) -> tuple[str, str] | None:
        """Post one READ of the prefill's slot; else why not, as (reason, detail)."""
        assert meta.remote is not None and self.transfer_topo is not None
        slot = StagedSlot.from_params(params)
        view, buffer = self._view, self._buffer
        if slot is None or view is None or buffer is None:
            return "off-here", "no staging on this worker, or malformed pd_staging params"
        if slot.signature != view.signature():
            return "layout", f"prefill regions of {slot.signature}, here {view.signature()}"
        engine_id = meta.remote.engine_id
        remote = self.transfer_topo.get_engine_info(engine_id)
        # Decode TP k times the prefill's: this rank reads region (rank % k) of the slot of the
        # one prefill rank holding its heads; the prefill packed k regions for exactly that.
        k = self.transfer_topo.tp_ratio(remote.remote_tp_size)
        sources = self.tp_mappings[engine_id].all_source_ranks
        if (
            k != slot.splits
            or len(sources) != 1
            or remote.remote_block_size != self.block_size
            or self._physical_blocks_per_logical_kv_block != 1
        ):
            return "topology", (
                f"TP ratio {k} with {slot.splits} packed regions, or block sizes "
                f"{remote.remote_block_size} -> {self.block_size}"
            )
        local = meta.local_physical_block_ids
        if len(local) != 1 or len(local[0]) > slot.num_blocks:
            return "topology", f"{len(local)} KV groups, {len(local[0])} blocks to fill"
        offset = self._ring.alloc(slot.num_blocks)
        if offset is None:
            return "decode-buffer-full", f"{slot.num_blocks} blocks wanted"
        source = next(iter(sources))
        nbytes = slot.num_blocks * view.bytes_per_block  # one region: this rank's heads
        local_addr = buffer.data_ptr() + offset * view.bytes_per_block
        remote_addr, remote_device = slot.ranks[source]
        remote_addr += slot.offset_blocks * k * view.bytes_per_block + (self.tp_rank % k) * nbytes
        mem_type = "DRAM" if buffer.device.type == "cpu" else self.nixl_memory_type
        local_device = max(buffer.get_device(), 0)
        notif = f"{meta.remote.request_id}:{self.tp_mappings[engine_id].local_consumers}"
        agent = self._remote_agents[engine_id][(0, source)]
        self._engine_last_active[engine_id] = time.perf_counter()
        self._recving_transfers.setdefault(req_id, [])
        try:
            handle = self.nixl_wrapper.initialize_xfer(
                "READ",
                self.nixl_wrapper.get_xfer_descs([(local_addr, nbytes, local_device)], mem_type),
                self.nixl_wrapper.get_xfer_descs([(remote_addr, nbytes, remote_device)], mem_type),
                agent,
                notif.encode(),
            )
            self.nixl_wrapper.transfer(handle)
        except Exception as e:  # as vLLM's own path: the request fails over to recompute
            self._ring.free(offset)
            self._log_failure(
                failure_type="transfer_setup_failed",
                req_id=req_id,
                msg="staged read",
                error=e,
                dst_engine_id=engine_id,
                remote_rank=source,
            )
            self._handle_failed_transfer(req_id, None, self._recv_failures)
            return None
        self._recving_transfers[req_id].append(handle)
        self._staged_recv[req_id] = (offset, slot.num_blocks, list(local[0]))
        logger.debug(
            "staged read %s: one descriptor of %d B, %d of its %d blocks are new here",
            req_id,
            nbytes,
            len(local[0]),
            slot.num_blocks,
        )
        return None

    def get_transfer_results(self) -> Any:
        results = super().get_transfer_results()
        for req_id in results.failed_recving or ():  # e.g. its handshake failed before a read
            self._recv_params.pop(req_id, None)
        if not self._staged_recv:
            return results
        for req_id in results.finished_recving or ():
            staged = self._staged_recv.pop(req_id, None)
            if staged is None:
                continue
            offset, blocks, local = staged
            if req_id not in (results.failed_recving or ()):
                started = time.perf_counter()
                self._unpack(offset, blocks, local)
                # A freed slot can receive the next READ at once; the unpack must be done.
                self._sync_device()
                self.staging_stats.record_unpack(time.perf_counter() - started)
            self._ring.free(offset)
        return results

    def _unpack(self, offset: int, blocks: int, local: list[int]) -> None:
        """The slot's last ``len(local)`` blocks into ``local``: blocks the decode already had
        (its own prefix cache hit) were allocated no destination, as vLLM's per-block path does."""
        assert self._buffer is not None and self._view is not None
        view = self._view
        packed = view.slot(self._buffer, offset, blocks)[0][:, :, blocks - len(local) :]
        ids = torch.tensor(local, dtype=torch.int64)
        kv_unpack([packed], view.caches, view.layout, ids)


class PdStagingConnector(NixlPullConnector):
    """vLLM's pull-mode NixlConnector with staged transfers; ``kv_connector_extra_config``'s
    ``pd_staging`` mapping (:class:`StagingSettings`) configures it, its absence turns it off."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        # NixlBaseConnector, not NixlPullConnector: that one would build vLLM's own halves.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        assert vllm_config.kv_transfer_config is not None
        settings = StagingSettings.from_extra_config(
            vllm_config.kv_transfer_config.kv_connector_extra_config
        )
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = StagingScheduler(
                vllm_config, self.engine_id, kv_cache_config, settings
            )
        else:
            self.connector_worker = StagingWorker(
                vllm_config, self.engine_id, kv_cache_config, settings
            )

    def wait_for_save(self) -> None:
        super().wait_for_save()
        orders = getattr(self._connector_metadata, PACK_ATTR, None)
        if orders:
            assert isinstance(self.connector_worker, StagingWorker)
            self.connector_worker.pack(orders)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        scheduler = self.connector_scheduler
        if isinstance(scheduler, StagingScheduler):
            return None if scheduler.stats.is_empty() else scheduler.stats.clone_and_reset()
        return super().get_kv_connector_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return StagingStats(data=data) if data is not None else StagingStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return StagingPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if isinstance(self.connector_worker, StagingWorker):
            return self.connector_worker.worker_meta()
        return None
