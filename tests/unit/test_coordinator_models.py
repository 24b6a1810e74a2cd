"""One gateway, several models: pools, aliases, a canary split and LoRA adapters, against
recording fake sidecars (fakes: only routing is under test; real workers in
tests/e2e/test_multi_model.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.coordinator.routing import ModelRouter
from pd_runtime.errors import NotFoundError
from tests.servers import FakeEngine, free_port, serve, wait_for


def endpoint(name: str, role: str, address: str, url: str, *adapters: str) -> dict[str, Any]:
    return {"name": name, "role": role, "address": address, "url": url, "adapters": list(adapters)}


def two_pools(url_a: str, url_b: str, **extra: Any) -> CoordinatorConfig:
    """Pool a: a prefill worker and a decode sidecar holding lora-x; pool b: one decode sidecar."""
    return CoordinatorConfig.model_validate(
        {
            "pools": [
                {
                    "model": "tiny-a",
                    "endpoints": [
                        endpoint(
                            "prefill-a0", "prefill", "127.0.0.1:9100", "http://127.0.0.1:9100"
                        ),
                        endpoint("decode-a0", "decode", "127.0.0.1:9200", url_a, "lora-x"),
                    ],
                },
                {
                    "model": "tiny-b",
                    "endpoints": [endpoint("decode-b0", "decode", "127.0.0.1:9210", url_b)],
                },
            ],
            "adapter_refresh_s": 0,
            **extra,
        }
    )


@pytest.fixture
def gateway() -> Iterator[tuple[str, FakeEngine, FakeEngine]]:
    a, b = FakeEngine("sidecar-a"), FakeEngine("sidecar-b")
    aliases = {"chat-default": "tiny-b", "canary": [{"model": "tiny-a"}, {"model": "tiny-b"}]}
    with serve(a.app()) as url_a, serve(b.app()) as url_b:
        config = two_pools(url_a, url_b, aliases=aliases, canary_seed=0)
        with serve(create_app(config)) as url:
            yield url, a, b


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [r.getMessage() for r in caplog.records if "Got pod scores" in r.getMessage()]
    return [json.loads(line.split("Got pod scores ", 1)[1]) for line in lines]


def complete(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    return httpx.post(f"{url}/v1/completions", json=body)


# ---- config ---------------------------------------------------------------------------------


def test_pools_config_lists_every_served_name_and_endpoint() -> None:
    config = two_pools("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert config.served_names == ["tiny-a", "lora-x", "tiny-b"]
    assert [e.name for e in config.all_endpoints] == ["prefill-a0", "decode-a0", "decode-b0"]
    assert [e.name for e in config.by_role("decode")] == ["decode-a0", "decode-b0"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"models": ["x"]}, "either pools or models"),
        ({"aliases": {"chat": "nope"}}, "['nope'] not served here"),
        ({"aliases": {"tiny-a": "tiny-b"}}, "shadows a served model"),
        ({"aliases": {"c": [{"model": "tiny-a", "weight": 0}]}}, "greater than 0"),
        ({"discovery": {"type": "kubernetes", "namespace": "x"}}, "only static discovery"),
    ],
)
def test_bad_pool_configs_are_refused(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        two_pools("http://127.0.0.1:1", "http://127.0.0.1:2", **extra)


def test_a_name_served_by_two_pools_and_adapters_without_pools_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"names served twice.*lora-x"):
        CoordinatorConfig.model_validate(
            {
                "pools": [
                    {
                        "model": m,
                        "endpoints": [
                            endpoint(f"d-{m}", "decode", f"h:{p}", f"http://h:{p}", "lora-x")
                        ],
                    }
                    for m, p in (("a", 1), ("b", 2))
                ]
            }
        )
    with pytest.raises(ValidationError, match="adapters need pools"):
        CoordinatorConfig.model_validate(
            {"models": ["a"], "endpoints": [endpoint("d", "decode", "h:1", "http://h:1", "lora-x")]}
        )


# ---- routing through the gateway ------------------------------------------------------------


def test_each_model_reaches_its_own_pool_and_the_line_names_it(gateway, caplog) -> None:
    url, a, b = gateway
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    assert complete(url, "tiny-a").json()["served_by"] == "sidecar-a"
    assert complete(url, "tiny-b").json()["served_by"] == "sidecar-b"
    assert complete(url, "lora-x").json()["served_by"] == "sidecar-a"
    assert [r["model"] for r in a.requests] == ["tiny-a", "lora-x"]
    assert [r["model"] for r in b.requests] == ["tiny-b"]
    lines = decisions(caplog)
    assert [(r["model"], r["pool"], r.get("adapter")) for r in lines] == [
        ("tiny-a", "tiny-a", None),
        ("tiny-b", "tiny-b", None),
        ("lora-x", "tiny-a", "lora-x"),
    ]
    # Pool a disaggregates to its own prefill worker, but not an adapter request (prefill-a0
    # lacks lora-x: it is served direct); pool b has no prefill worker.
    assert [r["prefill"] for r in lines] == ["127.0.0.1:9100", None, None]
    debug = httpx.get(f"{url}/debug/scheduler").json()
    assert set(debug["pools"]) == {"tiny-a", "tiny-b"}
    assert debug["recent"][-1]["adapter"] == "lora-x"


def test_an_alias_is_rewritten_for_the_worker(gateway, caplog) -> None:
    url, _, b = gateway
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    response = complete(url, "chat-default", stream=True)
    assert response.status_code == 200 and "sidecar-b" in response.text
    assert b.requests == [{"model": "tiny-b", "prompt": "hi", "max_tokens": 2, "stream": True}]
    (line,) = decisions(caplog)
    assert (line["model"], line["served"], line["pool"]) == ("chat-default", "tiny-b", "tiny-b")


def test_models_lists_models_adapters_and_aliases(gateway) -> None:
    url, _, _ = gateway
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-a", "lora-x", "tiny-b", "chat-default", "canary"]
    by_id = {m["id"]: m for m in data}
    assert by_id["lora-x"]["parent"] == "tiny-a"
    assert by_id["canary"]["alias_of"] == ["tiny-a", "tiny-b"]
    assert "parent" not in by_id["tiny-b"]


def test_unknown_model_is_an_openai_404_listing_what_exists(gateway) -> None:
    url, a, b = gateway
    response = complete(url, "gpt-9")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "NotFoundError" and error["param"] == "model"
    assert "tiny-a, lora-x, tiny-b, chat-default, canary" in error["message"]
    assert a.requests == b.requests == []


def test_one_pool_down_leaves_the_other_serving() -> None:
    a = FakeEngine("sidecar-a")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: pool b's decode is down
    with serve(a.app()) as url_a:
        config = two_pools(url_a, dead, max_attempts=1)
        with serve(create_app(config)) as url:
            assert complete(url, "tiny-b").status_code == 502
            for _ in range(3):
                assert complete(url, "tiny-a").json()["served_by"] == "sidecar-a"


# ---- the canary split -----------------------------------------------------------------------


def test_canary_split_follows_the_weights_and_the_seed() -> None:
    config = two_pools(
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        aliases={"chat": [{"model": "tiny-a", "weight": 9}, {"model": "tiny-b", "weight": 1}]},
        canary_seed=42,
    )
    router = ModelRouter(config)
    draws = [router.resolve("chat") for _ in range(4000)]
    counts = Counter(draws)
    assert 0.87 < counts["tiny-a"] / 4000 < 0.93
    again = ModelRouter(config)
    assert [again.resolve("chat") for _ in range(4000)] == draws  # same seed, same split
    assert router.resolve("tiny-b") == "tiny-b"
    with pytest.raises(NotFoundError, match="Models served here: tiny-a, lora-x, tiny-b, chat"):
        router.resolve("nope")


def test_canary_requests_reach_both_pools_by_weight(gateway) -> None:
    url, a, b = gateway
    for _ in range(40):
        assert complete(url, "canary").status_code == 200
    assert len(a.requests) + len(b.requests) == 40
    assert 10 <= len(a.requests) <= 30  # weights 1:1
    assert {r["model"] for r in a.requests} == {"tiny-a"}
    assert {r["model"] for r in b.requests} == {"tiny-b"}


# ---- adapters learnt from the workers --------------------------------------------------------


def lora_worker(adapters: list[str], parent: str) -> FastAPI:
    """A named fake of vLLM's /v1/models with LoRA modules (the real one in the e2e module)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": parent, "parent": None}] + [{"id": n, "parent": parent} for n in adapters]
        return {"object": "list", "data": data}

    return app


def test_adapters_listed_by_a_worker_become_routable() -> None:
    a, b = FakeEngine("sidecar-a"), FakeEngine("sidecar-b")
    with (
        serve(a.app()) as url_a,
        serve(b.app()) as url_b,
        serve(lora_worker(["lora-new"], "tiny-b")) as worker_b,
    ):
        config = two_pools(url_a, url_b).model_copy(update={"adapter_refresh_s": 0.2})
        pools = [p.model_dump() for p in config.pools]
        pools[1]["endpoints"][0]["address"] = worker_b.removeprefix("http://")
        config = CoordinatorConfig.model_validate(
            {**config.model_dump(exclude={"pools"}), "pools": pools}
        )
        with serve(create_app(config)) as url:
            wait_for(
                lambda: (
                    "lora-new" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
                ),
                timeout_s=10,
            )
            assert complete(url, "lora-new").json()["served_by"] == "sidecar-b"
            assert b.requests[-1]["model"] == "lora-new"
