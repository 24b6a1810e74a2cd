"""Several models behind one gateway: one scheduler (index, scorers, load) per model's pool.

::

    request.model ──▶ pool (by served name: the model or one of its LoRA adapters)
                        └─▶ that pool's own scheduler (kv-aware: its own prefix index and
                            KV-event subscribers, its own profiles), unchanged

A pool's scheduler sees only its own endpoints, so one model's workers never serve another's
requests and one pool's load or failures never weigh on another's choices. An adapter request
is restricted to the endpoints that hold the adapter (``SchedulingRequest.eligible``), prefill
included: the decider disaggregates only to a prefill endpoint with the adapter, else it serves
direct. Which endpoint holds which adapter comes from the config (``EndpointConfig.adapters``),
and :meth:`PooledScheduler.learn_adapters` adds what the workers' ``/v1/models`` list (vLLM lists
each LoRA module with its base model as ``parent``).

The ``release``/``first_chunk``/``stream_end`` calls go to the pool that scheduled the request
(by ``request.model``); ``report_failure`` to the pool owning the endpoint.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from hashlib import blake2b
from typing import Any

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import NoEndpointError
from pd_runtime.scheduling.base import Scheduler, SchedulingRequest, SchedulingResult

__all__ = ["Pool", "PooledScheduler"]

log = logging.getLogger(__name__)

#: Decisions kept for ``/debug/scheduler`` (``recent``).
_RECENT = 32


@dataclass
class Pool:
    """One served base model: its scheduler, and its adapters' holders (adapter -> addresses)."""

    model: str
    scheduler: Scheduler
    holders: dict[str, set[str]]
    #: (adapter, address) pairs from the config: kept whatever the workers list.
    configured: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, model: str, scheduler: Scheduler) -> Pool:
        holders: dict[str, set[str]] = {}
        for e in scheduler.endpoints:
            for adapter in e.adapters:
                holders.setdefault(adapter, set()).add(e.address)
        configured = frozenset((a, addr) for a, held in holders.items() for addr in held)
        return cls(model, scheduler, holders, configured)


def _salt(adapter: str) -> int:
    """An adapter's prompt keys are the base keys re-hashed with this (deterministic: blake2b,
    not ``hash`` of a str). vLLM caches an adapter's blocks apart from the base model's (its block
    hash has the LoRA name and path as extra keys), so an adapter request must not count the base
    model's blocks as cached. Its keys match only other requests of the same adapter through the
    pending overlay; the adapter's own KV events (keyed with vLLM's extra keys) are not matched,
    so its prefix affinity lasts as long as the overlay's entries (``pending_ttl_s``)."""
    return int.from_bytes(blake2b(adapter.encode(), digest_size=8).digest(), "little")


class PooledScheduler(Scheduler):
    """Routes each request to its model's pool; see the module docstring."""

    def __init__(self, pools: Mapping[str, Scheduler]) -> None:
        self.pools = {model: Pool.of(model, s) for model, s in pools.items()}
        super().__init__([e for p in self.pools.values() for e in p.scheduler.endpoints])
        self.times_answers = any(p.scheduler.times_answers for p in self.pools.values())
        self._owner = {
            e.address: pool for pool in self.pools.values() for e in pool.scheduler.endpoints
        }
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        #: Bumped whenever the served names change (an adapter learnt): callers cache on it.
        self.version = 0
        #: served name -> (pool, adapter), rebuilt when ``version`` moves (see resolve).
        self._by_name: tuple[int, dict[str, tuple[Pool, str | None]]] | None = None

    # -- which pool, which adapter ---------------------------------------------------------------

    def resolve(self, served: str) -> tuple[Pool, str | None]:
        """The pool serving ``served`` (a model or an adapter) and the adapter (None: the base
        model). Raises NoEndpointError when nothing serves it."""
        if self._by_name is None or self._by_name[0] != self.version:
            # Asked several times per request (gateway, prepare, schedule, release, stream end):
            # one dict lookup each, not a walk over the pools' adapters.
            by_name: dict[str, tuple[Pool, str | None]] = {}
            for pool in self.pools.values():
                by_name.update((a, (pool, a)) for a in pool.holders)
            by_name.update((model, (pool, None)) for model, pool in self.pools.items())
            self._by_name = (self.version, by_name)
        found = self._by_name[1].get(served)
        if found is None:
            raise NoEndpointError(f"no pool serves the model {served!r}")
        return found

    def served_names(self) -> list[str]:
        """Models and adapters, in pool order (adapters learnt from workers included)."""
        return [n for p in self.pools.values() for n in (p.model, *sorted(p.holders))]

    def adapter_parents(self) -> dict[str, str]:
        return {a: p.model for p in self.pools.values() for a in p.holders}

    def learn_adapters(self, address: str, models: Sequence[Mapping[str, Any]]) -> list[str]:
        """Record the adapters a worker's ``/v1/models`` lists (entries whose ``parent`` is the
        endpoint's pool model); return the ones that were new. An adapter learnt earlier that the
        worker no longer lists (unloaded) is forgotten there; those in the config never are."""
        pool = self._owner.get(address)
        if pool is None:
            return []
        listed = {e.get("id") for e in models if e.get("parent") == pool.model}
        for adapter, holders in list(pool.holders.items()):
            if address not in holders or adapter in listed:
                continue
            if (adapter, address) not in pool.configured:
                holders.discard(address)
                log.info("%s no longer lists adapter %r", address, adapter)
                self.version += 1
                if not holders:
                    del pool.holders[adapter]
        new: list[str] = []
        for entry in models:
            name, parent = entry.get("id"), entry.get("parent")
            if not isinstance(name, str) or parent != pool.model or name == pool.model:
                continue
            if name in self.pools or any(
                name in p.holders for p in self.pools.values() if p is not pool
            ):
                log.warning("%s lists adapter %r, already served by another pool", address, name)
                continue
            holders = pool.holders.setdefault(name, set())
            if address not in holders:
                holders.add(address)
                new.append(name)
        if new:
            self.version += 1
        return new

    # -- the Scheduler contract, delegated -------------------------------------------------------

    def _pool(self, request: SchedulingRequest) -> Pool:
        return self.resolve(request.model)[0]

    async def prepare(self, request: SchedulingRequest) -> SchedulingRequest:
        pool, adapter = self.resolve(request.model)
        prepared = await pool.scheduler.prepare(request)
        if adapter is not None:
            keys = prepared.block_keys
            if keys:  # apart from the base model's blocks (see _salt)
                salt = _salt(adapter)
                keys = [hash((key, salt)) for key in keys]
            prepared = replace(prepared, eligible=frozenset(pool.holders[adapter]), block_keys=keys)
        return prepared

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        pool, adapter = self.resolve(request.model)
        result = pool.scheduler.schedule(request)
        self.recent.append(
            {
                "x-request-id": request.request_id,
                "model": request.model,
                "pool": pool.model,
                "adapter": adapter,
                "decode": result.decode.address,
                "prefill": result.prefill.address if result.prefill else None,
                "reason": result.reason,
            }
        )
        return result

    def release(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        self._pool(request).scheduler.release(request, result)

    def first_chunk(
        self, request: SchedulingRequest, result: SchedulingResult, ttft_s: float | None
    ) -> None:
        self._pool(request).scheduler.first_chunk(request, result, ttft_s)

    def stream_end(
        self, request: SchedulingRequest, result: SchedulingResult, tpot_s: float
    ) -> None:
        self._pool(request).scheduler.stream_end(request, result, tpot_s)

    def report_failure(self, endpoint: EndpointConfig, error: str) -> None:
        pool = self._owner.get(endpoint.address)
        if pool is not None:
            pool.scheduler.report_failure(endpoint, error)

    async def set_endpoints(self, endpoints: Sequence[EndpointConfig]) -> None:
        """Static pools only (the config refuses dynamic discovery with pools): nothing moves."""

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.scheduler.start()

    async def stop(self) -> None:
        for pool in self.pools.values():
            await pool.scheduler.stop()

    def explain(self, request: SchedulingRequest) -> dict[str, Any]:
        try:
            pool, adapter = self.resolve(request.model)
        except NoEndpointError as exc:
            return {"error": str(exc)}
        return {"pool": pool.model, "adapter": adapter, **pool.scheduler.explain(request)}

    def debug_state(self) -> dict[str, Any]:
        pools: dict[str, Any] = {}
        endpoints: list[dict[str, Any]] = []
        for pool in self.pools.values():
            state = pool.scheduler.debug_state()
            state["adapters"] = {a: sorted(h) for a, h in sorted(pool.holders.items())}
            pools[pool.model] = state
            endpoints += [{**e, "pool": pool.model} for e in state.get("endpoints", [])]
        policies = sorted({str(s.get("policy", "")) for s in pools.values()} - {""})
        return {
            "policy": "pools(" + ",".join(policies) + ")",
            "endpoints": endpoints,
            "pools": pools,
            "recent": list(self.recent),
        }
