"""Several models behind one scheduler: the pooled scheduler and LoRA adapter eligibility."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import NoEndpointError
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from pd_runtime.scheduling.pools import PooledScheduler
from pd_runtime.scheduling.round_robin import RoundRobinScheduler


def ep(name: str, role: str, port: int, adapters: tuple[str, ...] = ()) -> EndpointConfig:
    address = f"127.0.0.1:{port}"
    return EndpointConfig(
        name=name, role=role, address=address, url=f"http://{address}", adapters=list(adapters)
    )  # type: ignore[arg-type]


# Pool "a": prefill-a0 lacks the adapter, prefill-a1 has it; decode-a0 has it, decode-a1 not.
POOL_A = [
    ep("prefill-a0", "prefill", 8100),
    ep("prefill-a1", "prefill", 8101, ("lora-x",)),
    ep("decode-a0", "decode", 8200, ("lora-x",)),
    ep("decode-a1", "decode", 8201),
]
POOL_B = [ep("prefill-b0", "prefill", 8110), ep("decode-b0", "decode", 8210)]


def kv_aware(endpoints: list[EndpointConfig]) -> KVAwareScheduler:
    return KVAwareScheduler(endpoints, tokenizer=None, block_size=4, pd_threshold_tokens=8, seed=0)


def request(model: str, rid: str = "r", tokens: list[int] | None = None) -> SchedulingRequest:
    # A fresh prompt per request id: the pending overlay would count a repeated one as cached.
    tokens = tokens or [zlib.crc32(f"{rid}-{i}".encode()) % 30000 for i in range(20)]
    return SchedulingRequest(
        rid,
        model,
        "/v1/completions",
        {"prompt": "x", "max_tokens": 4},
        token_ids=tokens,
        block_keys=PrefixIndex.block_keys(tokens, 4) if tokens is not None else None,
    )


def pooled(policy: Any = kv_aware, a: list[EndpointConfig] = POOL_A) -> PooledScheduler:
    return PooledScheduler({"a": policy(a), "b": policy(POOL_B)})


async def test_each_model_is_served_by_its_own_pool_only() -> None:
    s = pooled()
    assert s.served_names() == ["a", "lora-x", "b"]
    for i in range(6):
        for model, own in (("a", POOL_A), ("b", POOL_B)):
            req = await s.prepare(request(model, f"{model}{i}"))
            result = s.schedule(req)
            assert result.decode in own
            assert result.prefill is None or result.prefill in own
            s.release(req, result)
    # Bookings went back to the pool that made them (nothing in flight anywhere).
    for pool in s.pools.values():
        assert all(st.in_flight_requests == 0 for st in pool.scheduler.states.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", [kv_aware, RoundRobinScheduler])
async def test_an_adapter_request_goes_only_to_endpoints_holding_it(policy: Any) -> None:
    s = pooled(policy)
    assert s.resolve("lora-x")[0].model == "a"
    for i in range(6):
        req = await s.prepare(request("lora-x", f"x{i}"))
        assert req.eligible == frozenset({"127.0.0.1:8101", "127.0.0.1:8200"})
        result = s.schedule(req)
        assert result.decode.name == "decode-a0"
        assert result.prefill is not None and result.prefill.name == "prefill-a1"
        s.release(req, result)


@pytest.mark.parametrize("policy", [kv_aware, RoundRobinScheduler])
async def test_no_prefill_endpoint_with_the_adapter_means_served_direct(policy: Any) -> None:
    # Only decode-a0 holds the adapter: the long prompt is not disaggregated to a prefill worker
    # that would compute it without the adapter.
    a = [ep("prefill-a0", "prefill", 8100), *POOL_A[2:]]
    s = pooled(policy, a)
    req = await s.prepare(request("lora-x"))
    result = s.schedule(req)
    assert result.decode.name == "decode-a0"
    assert result.prefill is None
    if policy is kv_aware:
        assert result.reason == "no-prefill-endpoint"
    # The base model still disaggregates to that prefill worker.
    base = s.schedule(await s.prepare(request("a", "base")))
    assert base.prefill is not None and base.prefill.name == "prefill-a0"


async def test_failover_stays_among_the_adapter_holders() -> None:
    s = pooled()
    req = await s.prepare(request("lora-x"))
    retry = type(req)(**{**req.__dict__, "exclude": frozenset({"127.0.0.1:8200"})})
    with pytest.raises(NoEndpointError):
        s.schedule(retry)


async def test_unknown_model_has_no_pool() -> None:
    with pytest.raises(NoEndpointError, match="no pool serves"):
        pooled().resolve("nope")


def test_adapters_learnt_from_a_worker_models_list() -> None:
    s = pooled()
    listing = [
        {"id": "a", "parent": None},
        {"id": "lora-y", "parent": "a"},
        {"id": "lora-z", "parent": "other-base"},  # not this pool's base: ignored
        {"id": "b", "parent": "a"},  # another pool's model: refused
    ]
    with pytest.raises(NoEndpointError):  # not served yet (and the name index is built now)
        s.resolve("lora-y")
    assert s.learn_adapters("127.0.0.1:8201", listing) == ["lora-y"]
    assert s.learn_adapters("127.0.0.1:8201", listing) == []  # known now
    assert s.learn_adapters("127.0.0.1:9999", listing) == []  # not an endpoint of any pool
    assert s.resolve("lora-y") == (s.pools["a"], "lora-y")
    assert s.adapter_parents() == {"lora-x": "a", "lora-y": "a"}
    state = s.debug_state()
    assert state["pools"]["a"]["adapters"] == {
        "lora-x": ["127.0.0.1:8101", "127.0.0.1:8200"],
        "lora-y": ["127.0.0.1:8201"],
    }
    assert {e["pool"] for e in state["endpoints"]} == {"a", "b"}


async def test_debug_state_keeps_recent_decisions_with_pool_and_adapter() -> None:
    s = pooled()
    s.schedule(await s.prepare(request("lora-x", "r1")))
    s.schedule(await s.prepare(request("b", "r2")))
    recent = s.debug_state()["recent"]
    assert [(r["x-request-id"], r["pool"], r["adapter"]) for r in recent] == [
        ("r1", "a", "lora-x"),
        ("r2", "b", None),
    ]


async def test_an_adapter_prompt_does_not_count_the_base_model_blocks_as_cached() -> None:
    """vLLM caches an adapter's KV apart from the base model's: the base request's blocks (here
    pending on decode-a0) must not make the adapter request look cached there."""
    s = pooled()
    prompt = list(range(1000, 1020))
    base = await s.prepare(request("a", "base", prompt))
    s.schedule(base)  # books its blocks on the chosen decode endpoint (pending overlay)
    lora = await s.prepare(request("lora-x", "x1", prompt))
    assert set(lora.block_keys or []).isdisjoint(base.block_keys or [])
    first = s.schedule(lora)
    assert first.prefill is not None and first.cached_tokens == 0  # all 20 tokens uncached
    # A second request of the same adapter and prompt finds the first one's blocks.
    again = await s.prepare(request("lora-x", "x2", prompt))
    assert again.block_keys == lora.block_keys
    second = s.schedule(again)
    assert second.decode == first.decode and second.cached_tokens == 20


def test_an_unloaded_adapter_is_forgotten_but_a_configured_one_is_kept() -> None:
    s = pooled()
    s.learn_adapters("127.0.0.1:8201", [{"id": "lora-y", "parent": "a"}])
    version = s.version
    # decode-a1 unloaded lora-y; decode-a0 does not list lora-x (in the config): kept.
    s.learn_adapters("127.0.0.1:8201", [{"id": "a", "parent": None}])
    s.learn_adapters("127.0.0.1:8200", [{"id": "a", "parent": None}])
    assert s.version > version
    assert "lora-y" not in s.served_names()
    with pytest.raises(NoEndpointError):
        s.resolve("lora-y")
    assert s.pools["a"].holders["lora-x"] == {"127.0.0.1:8101", "127.0.0.1:8200"}
