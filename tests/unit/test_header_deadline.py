"""The request-head deadline (slowloris), over real sockets, for both uvicorn HTTP parsers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request

from pd_runtime import cli
from pd_runtime.common import server as common_server
from pd_runtime.common.asgi import DISCONNECT_HOOK, DisconnectHook
from pd_runtime.common.header_deadline import header_deadline_protocol
from tests.servers import free_port

TIMEOUT_S = 0.5
MARGIN_S = 1.5
PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    return app


@contextlib.contextmanager
def _server(implementation: str) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(
        _app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=header_deadline_protocol(TIMEOUT_S, implementation),
        backlog=2048,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _request(body: bytes) -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        pass
    return True, received


implementations = pytest.mark.parametrize("implementation", ["httptools", "h11"])


@implementations
def test_half_sent_heads_are_closed_while_a_normal_request_is_served(implementation: str) -> None:
    with _server(implementation) as port:
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        idle = socket.create_connection(("127.0.0.1", port))  # never sends a byte
        try:
            for sock in slow:
                sock.sendall(PARTIAL_HEAD)
            opened = time.monotonic()
            with socket.create_connection(("127.0.0.1", port)) as good:
                good.sendall(_request(b'{"prompt": "hi"}'))
                assert b'{"received":16}' in _read_response(good)
            for sock in [*slow, idle]:
                left = max(0.1, opened + TIMEOUT_S + MARGIN_S - time.monotonic())
                closed, received = _closed_within(sock, left)
                assert closed, "a connection with half a head outlived the header timeout"
                if sock is idle:
                    assert received == b""  # nothing sent, nothing answered
                else:
                    assert received.startswith(b"HTTP/1.1 408 ")
                    assert b"RequestTimeoutError" in received
        finally:
            for sock in [*slow, idle]:
                sock.close()


@implementations
def test_a_slow_body_after_a_complete_head_is_not_cut(implementation: str) -> None:
    body = b'{"prompt": "' + b"x" * 38 + b'"}'  # 52 bytes
    request = _request(body)
    head_end = request.index(b"\r\n\r\n") + 4
    with _server(implementation) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request[:head_end])
        for i in range(0, len(body), 13):  # ~4 x TIMEOUT_S in all
            time.sleep(TIMEOUT_S / 2)
            sock.sendall(body[i : i + 13])
        sock.settimeout(5)
        assert b'{"received":52}' in _read_response(sock)


@implementations
def test_the_deadline_applies_again_to_the_next_request_on_a_kept_alive_connection(
    implementation: str,
) -> None:
    with _server(implementation) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(_request(b"{}"))
        assert b'{"received":2}' in _read_response(sock)
        # Idle for longer than the head deadline: that is keep-alive's business (5 s), not ours.
        time.sleep(TIMEOUT_S * 2)
        sock.sendall(_request(b"{}"))
        assert b'{"received":2}' in _read_response(sock)
        sock.sendall(PARTIAL_HEAD)
        started = time.monotonic()
        closed, received = _closed_within(sock, TIMEOUT_S + MARGIN_S)
        assert closed and received.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started >= TIMEOUT_S * 0.8


def test_a_bad_timeout_or_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="> 0"):
        header_deadline_protocol(0)
    with pytest.raises(ValueError, match="unknown"):
        header_deadline_protocol(1, "h3")


def test_run_server_serves_with_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[uvicorn.Config] = []
    monkeypatch.setattr(
        common_server.DrainingServer, "run", lambda self: configs.append(self.config)
    )
    app = FastAPI()
    app.state.lifecycle = common_server.Lifecycle()
    common_server.run_server(app, host="127.0.0.1", port=1, drain_timeout_s=1, header_timeout_s=3)
    common_server.run_server(app, host="127.0.0.1", port=1, drain_timeout_s=1)
    assert getattr(configs[0].http, "header_timeout_s", None) == 3
    assert configs[1].http == "auto"


def test_header_timeout_reaches_the_sidecar_and_the_coordinator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        common_server, "run_server", lambda app, **kw: calls.append({"app": app, **kw})
    )
    monkeypatch.setattr("pd_runtime.logging_setup.setup_logging", lambda *_, **__: None)
    sidecar = ["sidecar", "--port", "1", "--decode-url", "http://127.0.0.1:2"]
    assert cli.main([*sidecar, "--header-timeout", "7"]) == 0
    assert cli.main(sidecar) == 0
    assert [c["header_timeout_s"] for c in calls] == [7.0, 10.0]
    assert calls[0]["app"].state.settings.header_timeout_s == 7.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*sidecar, "--header-timeout", "0"])

    config = tmp_path / "coordinator.yaml"
    config.write_text(
        "models: [m]\nheader_timeout_s: 4\nendpoints:\n"
        "  - {name: d, role: decode, address: '127.0.0.1:2', url: 'http://127.0.0.1:2'}\n"
    )
    assert cli.main(["coordinator", "--config", str(config)]) == 0
    assert calls[-1]["header_timeout_s"] == 4


def test_the_deployment_sections_take_a_header_timeout() -> None:
    from pd_runtime.config.deployment import CoordinatorSection, SidecarConfig

    assert CoordinatorSection(port=8000, header_timeout_s=3).header_timeout_s == 3
    assert SidecarConfig(port=8300).header_timeout_s == 10.0


def test_the_httptools_protocol_hands_each_request_a_hook_fired_when_its_client_leaves() -> None:
    """The path ``ClientWatch`` relies on (``common.asgi``): the scope carries a disconnect hook,
    fired by a connection lost mid-response and not by one closed after a complete response."""
    hooks: dict[str, DisconnectHook] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        hooks[scope["path"]] = scope["extensions"][DISCONNECT_HOOK]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":  # a stream that never ends unless its client leaves
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await asyncio.sleep(30)
        await send({"type": "http.response.body", "body": b"done"})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning",
        http=header_deadline_protocol(TIMEOUT_S, "httptools"), lifespan="off",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 3
        while not hooks["/stream"].fired:
            assert time.monotonic() < deadline, "the hook was not fired when the client left"
            time.sleep(0.01)
        assert not hooks["/whole"].fired  # closed after its response was complete
    finally:
        server.should_exit = True
        thread.join(timeout=10)
