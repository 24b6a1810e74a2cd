"""The coordinator's HTTP edge under bad input, oversized bodies, wrong methods and API keys, against
a recording fake sidecar (a fake: only what reaches the worker is under test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.coordinator.edge import ApiKeys, resolve_api_keys
from pd_runtime.errors import AuthenticationError, ConfigError
from tests.servers import FakeEngine, serve


def config_for(sidecar_url: str, **overrides: Any) -> CoordinatorConfig:
    return CoordinatorConfig.model_validate(
        {
            "models": ["tiny"],
            "endpoints": [
                {
                    "name": "decode-0",
                    "role": "decode",
                    "address": "127.0.0.1:9200",
                    "url": sidecar_url,
                }
            ],
            **overrides,
        }
    )


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["message"], str) and error["type"]
    if param is not None:
        assert error["param"] == param
    return str(error["message"])


@pytest.fixture(scope="module")
def edge() -> Iterator[tuple[str, FakeEngine]]:
    fake = FakeEngine("sidecar-0")
    with serve(fake.app()) as sidecar_url:
        config = config_for(sidecar_url, max_body_bytes=8192, max_tokens_limit=1000)
        with serve(create_app(config)) as url:
            yield url, fake


@pytest.fixture
def gateway(edge: tuple[str, FakeEngine]) -> Iterator[tuple[str, FakeEngine]]:
    url, fake = edge
    fake.requests.clear()
    fake.headers.clear()
    yield url, fake


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "needle"),
    [
        (COMPLETIONS, {"model": 7, "prompt": "x"}, "model", "'model'"),
        (COMPLETIONS, {"model": "tiny"}, "prompt", "'prompt' is required"),
        (COMPLETIONS, {"model": "tiny", "prompt": None}, "prompt", "'prompt' is required"),
        (COMPLETIONS, {"model": "tiny", "prompt": 3}, "prompt", "'prompt' must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": {"a": 1}}, "prompt", "'prompt' must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": ["a", 1]}, "prompt", "'prompt' must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": [1, True]}, "prompt", "'prompt' must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": [[1], "a"]}, "prompt", "'prompt' must be"),
        (CHAT, {"model": "tiny"}, "messages", "'messages' is required"),
        (CHAT, {"model": "tiny", "messages": "hi"}, "messages", "non-empty array"),
        (CHAT, {"model": "tiny", "messages": []}, "messages", "non-empty array"),
        (CHAT, {"model": "tiny", "messages": ["hi"]}, "messages", "messages[0]"),
        (CHAT, {"model": "tiny", "messages": [{"content": "x"}]}, "messages", "'role'"),
        (CHAT, {"model": "tiny", "messages": OK_MESSAGES, "stream": "yes"}, "stream", "boolean"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "stream": 1}, "stream", "boolean"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer"),
        (
            COMPLETIONS,
            {"model": "tiny", "prompt": "x", "max_tokens": True},
            "max_tokens",
            "integer",
        ),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens", "negative"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 1001}, "max_tokens", "limit"),
        (
            COMPLETIONS,
            {"model": "tiny", "prompt": "x", "max_tokens": 10**30},
            "max_tokens",
            "limit",
        ),
        (
            CHAT,
            {"model": "tiny", "messages": OK_MESSAGES, "max_completion_tokens": -5},
            "max_completion_tokens",
            "negative",
        ),
    ],
)
def test_malformed_fields_are_400s_that_name_the_field_and_reach_no_worker(
    gateway, path, body, param, needle
) -> None:
    url, fake = gateway
    message = assert_openai_error(httpx.post(f"{url}{path}", json=body), 400, param)
    assert needle in message
    assert fake.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 1000, "stream": False}),
        (COMPLETIONS, {"model": "tiny", "prompt": ["a", "b"], "max_tokens": None}),
        (COMPLETIONS, {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 0}),
        (COMPLETIONS, {"model": "tiny", "prompt": [[1, 2], [3]], "temperature": "vLLM decides"}),
        (COMPLETIONS, {"model": "tiny", "prompt_embeds": "base64..."}),
        (CHAT, {"model": "tiny", "messages": OK_MESSAGES, "max_completion_tokens": 7}),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ],
)
def test_well_formed_requests_are_forwarded_byte_for_byte(gateway, path, body) -> None:
    url, fake = gateway
    content = json.dumps(body).encode()
    response = httpx.post(
        f"{url}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert fake.requests == [body]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b'{"model": "tiny", "prompt": "\xc3\x28"}',
        b"",
        b"[" * 3000,
        b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 4400 + b"}",
    ],
)
def test_undecodable_bodies_are_400s(gateway, content) -> None:
    url, fake = gateway
    response = httpx.post(
        f"{url}{COMPLETIONS}", content=content, headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_openai_error(response, 400)
    assert fake.requests == []


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None, True])
def test_a_body_that_is_not_an_object_is_a_400(gateway, value) -> None:
    url, _ = gateway
    response = httpx.post(f"{url}{CHAT}", content=json.dumps(value).encode())
    assert "JSON object" in assert_openai_error(response, 400)


def test_a_declared_oversized_body_is_a_413_and_is_not_read(gateway) -> None:
    url, fake = gateway
    body = {"model": "tiny", "prompt": "x" * 9000}
    message = assert_openai_error(httpx.post(f"{url}{COMPLETIONS}", json=body), 413)
    assert "8192" in message
    assert fake.requests == []


def test_a_streamed_oversized_body_is_a_413_counted_as_it_arrives(gateway) -> None:
    url, fake = gateway

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{url}{COMPLETIONS}", content=chunks())  # chunked: no Content-Length
    assert_openai_error(response, 413)
    assert fake.requests == []


def test_a_streamed_body_within_the_limit_is_forwarded(gateway) -> None:
    url, fake = gateway

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", '
        yield b'"prompt": "hello"}'

    assert httpx.post(f"{url}{COMPLETIONS}", content=chunks()).status_code == 200
    assert fake.requests == [{"model": "tiny", "prompt": "hello"}]


def test_an_invalid_content_length_is_a_400(gateway) -> None:
    url, _ = gateway
    with httpx.Client() as client:
        request = client.build_request("POST", f"{url}{COMPLETIONS}", content=b"{}")
        request.headers["content-length"] = "2"
        assert client.send(request).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", COMPLETIONS, "POST"),
        ("PUT", CHAT, "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", "/health", "GET"),
        ("PATCH", "/metrics", "GET"),
    ],
)
def test_a_wrong_method_on_a_known_path_is_a_405_in_openai_format(
    gateway, method, path, allow
) -> None:
    url, _ = gateway
    response = httpx.request(method, f"{url}{path}")
    assert_openai_error(response, 405)
    assert response.json()["error"]["type"] == "MethodNotAllowedError"
    assert response.headers["allow"] == allow


def test_unknown_paths_are_404s_for_every_method(gateway) -> None:
    url, _ = gateway
    for method in ("GET", "POST", "PATCH", "OPTIONS"):
        assert_openai_error(httpx.request(method, f"{url}/v1/nothing"), 404)


def test_a_bad_priority_header_is_a_400(gateway) -> None:
    url, fake = gateway
    response = httpx.post(
        f"{url}{COMPLETIONS}",
        json={"model": "tiny", "prompt": "x"},
        headers={"x-request-priority": "high"},
    )
    assert "x-request-priority" in assert_openai_error(response, 400)
    assert fake.requests == []


# --- API keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[str, FakeEngine]]:
    fake = FakeEngine("sidecar-0")
    with serve(fake.app()) as sidecar_url:
        config = config_for(sidecar_url, api_keys=["sk-alpha", "sk-beta"])
        with serve(create_app(config)) as url:
            yield url, fake


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer sk-wrong", "Basic sk-alpha", "sk-alpha", "Bearer sk-a"],
)
def test_without_a_valid_key_v1_paths_are_401(secured, authorization, caplog) -> None:
    url, fake = secured
    fake.requests.clear()
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path in (("POST", COMPLETIONS), ("POST", CHAT), ("GET", "/v1/models")):
        response = httpx.request(
            method, f"{url}{path}", json={"model": "tiny", "prompt": "x"}, headers=headers
        )
        assert_openai_error(response, 401)
        assert response.json()["error"]["type"] == "AuthenticationError"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/debug/scheduler", headers=headers).status_code == 401
    assert fake.requests == []
    assert "sk-alpha" not in caplog.text and "sk-beta" not in caplog.text


def test_with_a_valid_key_requests_pass_and_the_key_is_not_forwarded(secured) -> None:
    url, fake = secured
    fake.headers.clear()
    for key in ("sk-alpha", "sk-beta"):
        headers = {"authorization": f"bearer {key}"}
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
        response = httpx.post(
            f"{url}{COMPLETIONS}", json={"model": "tiny", "prompt": "x"}, headers=headers
        )
        assert response.status_code == 200
    assert [h.get("authorization") for h in fake.headers] == [None, None]


def test_health_and_metrics_stay_open_and_count_401s(secured) -> None:
    url, _ = secured
    httpx.get(f"{url}/v1/models")
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200
    assert 'pd_coordinator_errors_total{type="AuthenticationError"}' in metrics.text


def test_keys_come_from_config_and_env_and_are_masked_in_repr() -> None:
    config = config_for("http://127.0.0.1:1", api_keys=["sk-1"], api_keys_env="PD_KEYS")
    assert "sk-1" not in repr(config)
    assert resolve_api_keys(config, {"PD_KEYS": " sk-2, ,sk-3 "}) == ["sk-1", "sk-2", "sk-3"]
    with pytest.raises(ConfigError, match="PD_KEYS"):
        resolve_api_keys(config, {})
    # A dumped config (the launcher writes one) keeps the keys.
    assert config.model_dump(mode="json")["api_keys"] == ["sk-1"]
    with pytest.raises(ValueError, match="empty"):
        config_for("http://127.0.0.1:1", api_keys=[""])


def test_api_key_check() -> None:
    keys = ApiKeys(["k1"])
    keys.check("Bearer k1")
    keys.check("  bearer   k1 ")
    for bad in (None, "Bearer k2", "Bearer k1k1", "Token k1", "Bearer \udcff"):
        with pytest.raises(AuthenticationError):
            keys.check(bad)
    assert not ApiKeys([]).enabled
