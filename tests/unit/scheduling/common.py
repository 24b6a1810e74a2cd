"""Builders shared by the scheduling tests: endpoints, endpoint states, request contexts."""

from __future__ import annotations

import random

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.plugins import EndpointState, RequestContext

BS = 4
A, B, C = "10.0.0.1:8200", "10.0.0.2:8200", "10.0.0.3:8200"


def endpoint(address: str, role: str = "decode", name: str | None = None) -> EndpointConfig:
    host, _, port = address.partition(":")
    return EndpointConfig(
        name=name or f"{role}-{host}-{port}",
        role=role,  # type: ignore[arg-type]
        address=address,
        url=f"http://{host}:{int(port) + 100}",
    )


def state(address: str, role: str = "decode", **fields: object) -> EndpointState:
    s = EndpointState(endpoint(address, role))
    for name, value in fields.items():
        assert hasattr(s, name), name
        setattr(s, name, value)
    return s


def context(
    token_ids: list[int] | None = None,
    *,
    cached: dict[str, int] | None = None,
    session: str | None = None,
    seed: int = 0,
    block_size: int = BS,
) -> RequestContext:
    """A request context as ``KVAwareScheduler.context`` builds it."""
    keys = PrefixIndex.block_keys(token_ids, block_size) if token_ids is not None else []
    request = SchedulingRequest("r", "m", "/v1/completions", {}, token_ids=token_ids)
    return RequestContext(
        request=request,
        token_ids=token_ids,
        block_size=block_size,
        block_keys=keys,
        cached_blocks=dict(cached or {}),
        session=session,
        rng=random.Random(seed),
    )
