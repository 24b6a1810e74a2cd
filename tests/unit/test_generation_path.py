"""The raw-ASGI generation path (``pd_runtime.common.asgi``): the connection's disconnect hook (our
HTTP protocol), or else one watcher task per request, cancels the request's own task when the
client leaves (and only then), the body read with the
gateway's limits, and errors nobody planned for still answered in the OpenAI shape."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from pd_runtime.common.asgi import (
    DISCONNECT_HOOK,
    ClientWatch,
    DisconnectHook,
    receive_body,
    request_headers,
)
from pd_runtime.coordinator.app import create_app
from pd_runtime.errors import BadRequestError, PayloadTooLargeError
from tests.servers import FakeEngine, serve
from tests.unit.test_coordinator_edge import assert_openai_error, config_for


class Client:
    """An ASGI ``receive`` whose client leaves when told to."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.messages = list(messages)
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await self.left.wait()
        return {"type": "http.disconnect"}


async def test_a_client_that_leaves_cancels_what_the_request_awaits() -> None:
    client = Client()
    outcome: list[str] = []

    async def request() -> None:
        watch = ClientWatch(client.receive)
        try:
            await asyncio.sleep(30)  # the upstream call
        except asyncio.CancelledError:
            outcome.append("client left" if watch.client_left() else "cancelled")
            if outcome[-1] != "client left":
                raise
        finally:
            watch.stop()
        await asyncio.sleep(0)  # the cancellation was absorbed: the task goes on
        outcome.append("went on")

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0.01)
    client.left.set()
    await asyncio.wait_for(task, 1)
    assert outcome == ["client left", "went on"]


@pytest.mark.parametrize("left_before_the_watch", [False, True])
async def test_with_the_connections_hook_no_task_watches_and_the_hook_cancels(
    left_before_the_watch: bool,
) -> None:
    hook = DisconnectHook()
    scope = {"type": "http", "extensions": {DISCONNECT_HOOK: hook}}
    outcome: list[str] = []
    started = asyncio.Event()

    async def never() -> dict[str, Any]:
        raise AssertionError("receive() must not be awaited when the connection calls back")

    async def request() -> None:
        tasks = len(asyncio.all_tasks())
        watch = ClientWatch(never, scope)
        outcome.append(f"tasks +{len(asyncio.all_tasks()) - tasks}")
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append("client left" if watch.client_left() else "cancelled")
        finally:
            watch.stop()

    if left_before_the_watch:
        hook.fire()  # the connection was lost while the body was read
    task = asyncio.ensure_future(request())
    await started.wait()
    if not left_before_the_watch:
        hook.fire()  # what the protocol's connection_lost does
    await asyncio.wait_for(task, 1)
    assert outcome == ["tasks +0", "client left"]
    assert hook.callback is None  # stop() or the firing let go of the request


async def test_a_stopped_watch_is_not_called_back() -> None:
    hook = DisconnectHook()
    watch = ClientWatch(lambda: None, {"extensions": {DISCONNECT_HOOK: hook}})
    watch.stop()
    hook.fire()  # the response had completed: nothing to cancel
    assert not watch.gone


async def test_a_real_cancellation_is_not_taken_for_the_client_leaving() -> None:
    client = Client()
    outcome: list[str] = []

    async def request() -> None:
        watch = ClientWatch(client.receive)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome.append("client left" if watch.client_left() else "cancelled")
            raise
        finally:
            watch.stop()

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0.01)
    task.cancel()  # shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled"]


async def test_one_watcher_task_per_request_and_none_left_behind() -> None:
    client = Client()
    before = len(asyncio.all_tasks())
    watch = ClientWatch(client.receive)
    assert len(asyncio.all_tasks()) == before + 1
    watch.stop()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before
    assert not watch.gone


async def test_the_body_is_read_whole_within_the_limit() -> None:
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True}]
    chunks += [{"type": "http.request", "body": b"cd", "more_body": False}]
    assert await receive_body(Client(*chunks).receive, {}, 4) == b"abcd"
    single = {"type": "http.request", "body": b"{}", "more_body": False}
    assert await receive_body(Client(single).receive, {}) == b"{}"
    with pytest.raises(PayloadTooLargeError):
        await receive_body(Client(*chunks).receive, {}, 3)
    with pytest.raises(PayloadTooLargeError):
        await receive_body(Client().receive, {"content-length": "9"}, 3)
    with pytest.raises(BadRequestError):
        await receive_body(Client().receive, {"content-length": "x"}, 3)
    gone = Client(chunks[0])
    gone.left.set()
    with pytest.raises(BadRequestError, match="disconnected"):
        await receive_body(gone.receive, {})


def test_headers_are_decoded_once_per_request() -> None:
    scope: dict[str, Any] = {"headers": [(b"x-a", b"1"), (b"x-b", b"\xe9")]}
    headers = request_headers(scope)
    assert headers == {"x-a": "1", "x-b": "é"}
    assert request_headers(scope) is headers


def test_an_unexpected_error_is_a_500_in_the_openai_shape_and_frees_the_slot() -> None:
    fake = FakeEngine("sidecar-0")
    with serve(fake.app()) as sidecar_url:
        app = create_app(config_for(sidecar_url))

        def broken(_: Any) -> Any:
            raise RuntimeError("a bug")

        app.state.scheduler.schedule = broken
        with serve(app) as url:
            response = httpx.post(
                f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
            )
            assert "internal error in the coordinator" in assert_openai_error(response, 500)
            assert app.state.admission.in_flight == 0
            assert httpx.get(f"{url}/health").status_code == 200
    assert fake.requests == []
