"""Property: whatever a client posts to a generation route, the coordinator answers in the OpenAI
shape, never fails on its own (no 500), holds no admission slot afterwards and stays healthy.
Runs against the real app and a recording fake sidecar (a fake: it accepts any JSON body)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pd_runtime.coordinator.app import create_app
from tests.servers import FakeEngine, serve
from tests.unit.test_coordinator_edge import config_for

UPSTREAM = {502, 503, 504}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system"]) | json_values,
            "content": json_values,
        },
    )
    | json_values,
    max_size=3,
)
prompts = (
    st.text(max_size=30)
    | st.lists(st.text(max_size=5), max_size=3)
    | st.lists(st.integers(-5, 2**40), max_size=5)
    | st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=3)
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny", "other"]) | json_values,
        "prompt": prompts | json_values,
        "messages": messages | json_values,
        "max_tokens": st.integers(-10, 2**40) | json_values,
        "max_completion_tokens": st.integers(-10, 2**40) | json_values,
        "stream": st.booleans() | json_values,
        "temperature": json_values,
    },
)
# Valid for both routes, then some fields replaced: reaches the worker often enough to matter.
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text()}),
    min_size=1,
    max_size=3,
)
near_valid = st.builds(
    lambda base, changes: {**base, **changes},
    st.fixed_dictionaries(
        {"model": st.just("tiny"), "prompt": prompts, "messages": valid_messages},
        optional={"max_tokens": st.integers(0, 10**6), "stream": st.booleans()},
    ),
    bodies,
)
payloads = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    near_valid.map(lambda b: json.dumps(b).encode()),
    near_valid.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.integers(1, 1500).map(
        lambda n: b'{"model": "tiny", "prompt": ' + b"[" * n + b"]" * n + b"}"
    ),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[httpx.Client, Any]]:
    fake = FakeEngine("sidecar-0")
    with serve(fake.app()) as sidecar_url:
        app = create_app(config_for(sidecar_url, max_body_bytes=2048, max_tokens_limit=10**6))
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            yield client, app


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    payload=payloads,
    priority=st.none() | st.integers(-(2**40), 2**40).map(str) | st.text(max_size=5),
)
def test_any_body_gets_a_well_formed_answer(fuzzed, path: str, payload: bytes, priority) -> None:
    client, app = fuzzed
    headers = {"content-type": "application/json"}
    # h11 refuses to send a value with leading or trailing whitespace (e.g. " "): not a request.
    if priority is not None and priority.isascii() and priority.isprintable():
        priority = priority.strip()
        headers["x-request-priority"] = priority
    response = client.post(path, content=payload, headers=headers)
    assert response.status_code < 500 or response.status_code in UPSTREAM, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        assert error["code"] == response.status_code
    else:
        assert response.status_code == 200
    # The slot is given back once the response has ended (just after the client has it all).
    deadline = time.monotonic() + 2
    while app.state.admission.in_flight:
        assert time.monotonic() < deadline, "admission slot leaked"
        time.sleep(0.001)
    assert client.get("/health").status_code == 200
