"""The generation path as plain ASGI: what the coordinator and the sidecar do per request on
``/v1/completions`` and ``/v1/chat/completions``, and nothing else.

Both servers serve those two paths with a plain ASGI handler (:func:`mount_generation`): a POST
there is dispatched to it by the innermost user middleware (the coordinator's gateway, with its
keys and admission control, stays outside it), past FastAPI's routing and dependency injection,
with no ``Request`` object and no ``StreamingResponse`` and its disconnect task group; the paths
are plain Starlette routes too, so another method on them is a 405. What a handler gets here:

* :func:`request_headers`: the request's headers decoded once (names lowercased by the server,
  values latin-1, a repeated header's last value as ``dict(request.headers)`` gave);
* :func:`receive_body`: the body, with the same 413/400 rules as :func:`~pd_runtime.common.body.read_body`;
* ``common.body.parse_json_body`` / :data:`encode_json`: msgspec, once per body, re-encoded only when
  a hop changes it;
* :class:`ClientWatch`: ONE task per request that waits for the client's ``http.disconnect`` and
  then cancels the request's own task, so whatever it awaits (the upstream call's headers, the
  prefill call, the next chunk) is cancelled and its connection closed (the worker behind it
  aborts the request). Before, each hop ran two tasks plus ``asyncio.wait`` until the upstream
  headers arrived, then Starlette's two-task group while streaming;
* :func:`send_upstream`: an open upstream response streamed back byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import msgspec

from pd_runtime.common.body import refuse_declared_length
from pd_runtime.common.headers import response_headers
from pd_runtime.common.upstream import TRANSPORT_ERRORS, UpstreamResponse
from pd_runtime.errors import BadRequestError, PayloadTooLargeError, UpstreamError

__all__ = [
    "DISCONNECT_HOOK",
    "HEADERS_KEY",
    "ClientWatch",
    "DisconnectHook",
    "encode_json",
    "mount_generation",
    "receive_body",
    "request_headers",
    "send_upstream",
]

logger = logging.getLogger(__name__)

#: Where a layer that already decoded the headers (the coordinator's gateway middleware) leaves
#: them in the ASGI scope, so the handler does not decode them again.
HEADERS_KEY = "pd_runtime.headers"

encode_json: Callable[[Any], bytes] = msgspec.json.Encoder().encode


def request_headers(scope: MutableMapping[str, Any]) -> dict[str, str]:
    """The request's headers as one dict, decoded once per request."""
    headers: dict[str, str] | None = scope.get(HEADERS_KEY)
    if headers is None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        scope[HEADERS_KEY] = headers
    return headers


async def receive_body(
    receive: Callable[[], Any], headers: dict[str, str], max_bytes: int | None = None
) -> bytes:
    """The request body. With ``max_bytes``: a declared ``Content-Length`` over it is refused
    (413) unread and a chunked body is counted as it arrives. A client that leaves while sending
    it is a 400."""
    if max_bytes is not None:
        refuse_declared_length(headers.get("content-length"), max_bytes)
    first = b""
    chunks: list[bytes] | None = None
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequestError("client disconnected while sending the request body")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
            if chunks is not None:
                chunks.append(chunk)
            elif first:
                chunks = [first, chunk]
            else:
                first = chunk
        if not message.get("more_body", False):
            return b"".join(chunks) if chunks is not None else first


#: The scope extension under which our HTTP protocol (``common.header_deadline``) hands a request
#: its :class:`DisconnectHook`.
DISCONNECT_HOOK = "pd.disconnect"


class DisconnectHook:
    """Set by the connection when its client goes away while this request's response is not
    complete; the request may leave one callback to be run then (``fired`` tells a late one)."""

    __slots__ = ("callback", "fired")

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


class ClientWatch:
    """Watches one request's client; when the client goes away it cancels the task that created
    the watch (the request's own), whatever that task is awaiting.

    Served by our HTTP protocol (the scope carries a :class:`DisconnectHook`), the connection
    itself calls back when it is lost: nothing per request but a callback. Elsewhere (another
    server, an in-process test transport) one task awaits ``receive()``; that task was ~15 % of
    the coordinator hop's CPU at 64 concurrent streams
    (``benchmarks/results/2026-12-07-decision-lines/disconnect-hook``).

    Create it once the body has been read (from then on the server answers ``receive()`` only on
    a disconnect); the request's task then catches ``CancelledError`` and asks :meth:`client_left`
    whether it was this watch's doing (then the cancellation is absorbed) or a real one (shutdown:
    re-raise). :meth:`stop` before the task ends."""

    __slots__ = ("_hook", "_task", "_watcher", "gone")

    def __init__(
        self, receive: Callable[[], Any], scope: MutableMapping[str, Any] | None = None
    ) -> None:
        self.gone = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher: asyncio.Future[None] | None = None
        hook = scope.get("extensions", {}).get(DISCONNECT_HOOK) if scope is not None else None
        self._hook: DisconnectHook | None = hook
        if hook is None:
            self._watcher = asyncio.ensure_future(self._watch(receive))
        elif hook.fired:  # gone already: cancelled at this task's next await, as the task would
            self._left()
        else:
            hook.callback = self._left

    def _left(self) -> None:
        self.gone = True
        self._task.cancel()

    async def _watch(self, receive: Callable[[], Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._left()

    def client_left(self) -> bool:
        """After a ``CancelledError``: True, and the cancellation undone, when the client left."""
        if self.gone and self._task.cancelling():
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        elif self._hook is not None:
            self._hook.callback = None


async def send_upstream(
    send: Callable[[dict[str, Any]], Any],
    upstream: UpstreamResponse,
    url: str,
    on_close: Callable[[int], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> None:
    """Stream an open upstream response back unchanged (status, headers, bytes), as
    :func:`~pd_runtime.common.streaming.stream_back` does, without a ``StreamingResponse``. The upstream
    response is closed when the stream ends, breaks or is cancelled (the client left), then
    ``on_close(upstream status)`` runs; ``on_chunk`` sees each chunk before it is passed on."""
    try:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status_code,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response_headers(upstream.headers).items()
                ],
            }
        )
        try:
            async for chunk in upstream.aiter_raw():
                if on_chunk is not None:
                    on_chunk(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TRANSPORT_ERRORS as exc:
            # The stream broke midway: the headers are gone already, so end an SSE stream with
            # an error event rather than a silent truncation.
            logger.warning("upstream stream from %s broke: %r", url, exc)
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                error = encode_json(UpstreamError(f"upstream stream broke: {exc!r}").to_body())
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + error + b"\n\n",
                        "more_body": True,
                    }
                )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        upstream.close()
        if on_close is not None:
            on_close(upstream.status_code)


class _Endpoint:
    """An ASGI callable as a Starlette ``Route`` endpoint (a plain function would be wrapped in a
    ``Request``/``Response`` adapter; an object with ``__call__`` is mounted as is)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.handler(scope, receive, send)


class _FastPath:
    """The innermost user middleware: a POST on a generation path goes straight to its handler,
    past Starlette's exception middleware, FastAPI's exit-stack middleware and the router (and
    their wrappers around every ``send``); anything else goes on to the app. Exceptions the
    handler does not answer itself still reach the outermost error middleware (a 500 in the
    OpenAI shape)."""

    def __init__(self, app: Any, handler: Callable[..., Any], paths: tuple[str, ...]) -> None:
        self.app = app
        self.handler = handler
        self.paths = frozenset(paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def mount_generation(app: Any, handler: Callable[..., Any], paths: tuple[str, ...]) -> None:
    """Serve POSTs on ``paths`` with the ASGI ``handler``: dispatched by a middleware placed inside
    every middleware already added (the coordinator's gateway: keys, admission), and routed as
    plain Starlette routes too (so the router knows the paths: another method is a 405). Call it
    before the app serves its first request."""
    from starlette.middleware import Middleware
    from starlette.routing import Route

    if app.middleware_stack is not None:
        raise RuntimeError("mount_generation after the app started")
    app.user_middleware.append(Middleware(_FastPath, handler=handler, paths=paths))
    endpoint = _Endpoint(handler)
    for i, path in enumerate(paths):
        app.router.routes.insert(i, Route(path, endpoint, methods=["POST"]))
