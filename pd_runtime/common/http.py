"""HTTP plumbing shared by the coordinator and the sidecar: header hygiene, streaming pass-through,
and OpenAI-format error responses.

Responses from upstream are streamed byte for byte (SSE included). The upstream hop is aiohttp (its
HTTP parser is in C): with httpx, the pure-Python HTTP client took about half of the sidecar's CPU
per request (``benchmarks/results/2026-11-24-components``). If the client goes away, the
upstream request is closed too, so the worker sees the disconnect and aborts the request instead of
generating into the void: before the response starts, :func:`unless_disconnected` cancels the
upstream call; once it streams, Starlette cancels the body and its ``finally`` closes upstream.
(That is the other paths'; the generation paths are plain ASGI, :mod:`pd_runtime.common.asgi`,
watching the client with one task per request.)
:class:`DrainingServer` and :class:`Lifecycle` give both servers a graceful SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import FrameType
from typing import Any, TypeVar

import aiohttp
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from pd_runtime.common.header_deadline import header_deadline_protocol
from pd_runtime.errors import (
    BadRequestError,
    ClientGone,
    NoEndpointError,
    PayloadTooLargeError,
    ServingError,
    UpstreamError,
    openai_error_body,
)

__all__ = [
    "GENERATION_PATHS",
    "PREFILLER_HEADER",
    "REQUEST_ID_HEADER",
    "TRANSPORT_ERRORS",
    "DrainingServer",
    "Fetched",
    "Lifecycle",
    "UpstreamClient",
    "UpstreamResponse",
    "error_response",
    "failure_kind",
    "forward_headers",
    "install_error_handlers",
    "listening_socket",
    "make_client",
    "open_upstream",
    "parse_json_body",
    "read_body",
    "refuse_declared_length",
    "response_headers",
    "run_server",
    "send_streaming",
    "stream_back",
    "unless_disconnected",
    "upstream_timeout",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILLER_HEADER = "x-prefiller-host-port"
REQUEST_ID_HEADER = "x-request-id"

# Hop-by-hop headers (RFC 9110 §7.6.1) and ones the server recomputes.
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "accept-encoding",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "date",
        "server",
    }
)


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """An upstream response's headers without the hop-by-hop ones and those the server sets."""
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE}


def forward_headers(
    headers: Mapping[str, str], *, drop: frozenset[str] = frozenset()
) -> dict[str, str]:
    return {
        k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST and k.lower() not in drop
    }


#: What a failed upstream call raises: a transport error, or a timeout (aiohttp's own timeouts are
#: both; ``asyncio.wait_for`` on the first byte raises the plain one).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)


def upstream_timeout(read_timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientTimeout:
    """No bound on the whole exchange (a stream may run for minutes): ``connect_timeout_s`` to open
    a connection, ``read_timeout_s`` for each read (the headers, then every chunk). Waiting for a
    free pooled connection plus opening one is bounded too (by the longer of the two), so a full
    pool fails the call rather than queueing it forever."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=max(read_timeout_s, connect_timeout_s),
        sock_connect=connect_timeout_s,
        sock_read=read_timeout_s,
    )


def failure_kind(exc: BaseException | None) -> str | None:
    """How an upstream call failed: ``connect_error`` (refused, unresolvable, connect timed out),
    ``timeout`` (no headers or data in time), ``transport_error`` (reset, broken response), or
    None when ``exc`` is not a transport failure."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect_error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError):
        return "transport_error"
    return None


def _merged(headers: Any) -> dict[str, str]:
    # A repeated header becomes one comma-separated value, names lowercased.
    merged: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return merged


class UpstreamResponse:
    """An upstream response whose status and headers are in and whose body is unread."""

    __slots__ = ("_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = _merged(response.headers)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, undecoded (transfer coding removed, content coding kept)."""
        return self._response.content.iter_any()

    async def aread(self) -> bytes:
        return await self._response.read()

    def close(self) -> None:
        """Give the connection back to the pool if the body was read to its end, else close it
        (so the worker sees the disconnect). Synchronous: a cancellation cannot skip it."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()

    async def aclose(self) -> None:
        self.close()


class Fetched:
    """A whole upstream response, body read (and decoded if the server compressed it)."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class UpstreamClient:
    """The pooled upstream client; one per process, reused by every request.

    Deliberate settings: no redirects followed; no cookie jar (one client serves every user, so a
    cookie set for one must not be sent for the next); no ``Content-Type`` made up for a body
    that came without one; responses passed on undecoded; 5 s keep-alive as before."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.timeout = upstream_timeout(read_timeout_s, connect_timeout_s)
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=5.0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Content-Type",),
        )

    async def open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the status and headers are in. Raises what aiohttp raises
        (:data:`TRANSPORT_ERRORS`). Cancelling it closes the connection."""
        response = await self.session.request(
            method,
            url,
            headers=headers,
            data=content or None,
            timeout=timeout or self.timeout,
            allow_redirects=False,
        )
        return UpstreamResponse(response)

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Fetched:
        """A whole request and response (``json_body`` sent as compact JSON, or ``content``: a
        body already encoded as JSON; ``Content-Type: application/json`` unless ``headers`` set
        one). Raises :data:`TRANSPORT_ERRORS`."""
        send = dict(headers or {})
        data = content
        if json_body is not None:
            data = json.dumps(
                json_body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        if data is not None and not any(k.lower() == "content-type" for k in send):
            send["Content-Type"] = "application/json"
        async with self.session.request(
            method,
            url,
            headers=send,
            data=data,
            timeout=timeout or self.timeout,
            allow_redirects=False,
            auto_decompress=True,
        ) as response:
            content = await response.read()
            return Fetched(response.status, _merged(response.headers), content)

    async def aclose(self) -> None:
        await self.session.close()


def make_client(connect_timeout_s: float, read_timeout_s: float) -> UpstreamClient:
    """A pooled client; one per process, reused by every request (call it in the event loop)."""
    return UpstreamClient(connect_timeout_s, read_timeout_s)


def error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers or None)


# OpenAI error ``type`` for statuses that Starlette/FastAPI raise on their own.
_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "PayloadTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


def install_error_handlers(app: FastAPI, component: str) -> None:
    """Whatever escapes a handler still reaches the client in the OpenAI error shape, and is logged
    with its traceback, rather than as a plain-text 500."""
    component_logger = logging.getLogger(f"pd_runtime.{component}")

    async def serving_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return error_response(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        component_logger.exception("unexpected error on %s %s", request.method, request.url.path)
        error = ServingError(f"internal error in the {component}: {type(exc).__name__}")
        return error_response(error)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _TYPE_BY_STATUS.get(exc.status_code, "InternalServerError")
        body = openai_error_body(str(exc.detail), kind, exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(BadRequestError(f"invalid request: {exc.errors()}"))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def refuse_declared_length(declared: str | None, max_bytes: int) -> None:
    """A ``Content-Length`` header over ``max_bytes`` is a 413 before any byte is read; one that
    is not a number is a 400."""
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise BadRequestError("invalid Content-Length header") from None
    if length > max_bytes:
        raise PayloadTooLargeError(
            f"request body of {length} bytes is over the limit of {max_bytes} bytes"
        )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) one over ``max_bytes`` before reading it whole: a declared
    ``Content-Length`` over the limit is refused unread, and a chunked body is counted as it
    arrives, so at most ``max_bytes`` (plus one chunk) is ever held in memory."""
    refuse_declared_length(request.headers.get("content-length"), max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequestError("client disconnected while sending the request body") from None
    return b"".join(chunks)


_decode_json = msgspec.json.Decoder().decode


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, decoded with msgspec, or a 400 that says why not."""
    try:
        body = _decode_json(raw)
    except (ValueError, RecursionError) as exc:
        # msgspec.DecodeError (bad JSON or UTF-8, NaN, a number out of range) is a ValueError;
        # RecursionError, nesting deeper than the decoder allows.
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


async def _disconnected(receive: Receive) -> None:
    # Once the body has been read, the server answers receive() only when the client is gone.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request | None, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` while watching the client (whose body must already be read); if the
    client goes away first, cancel it (an upstream call in flight closes its connection, so the worker
    behind it aborts the request, as vLLM does on a disconnect) and raise :class:`ClientGone`."""
    work = asyncio.ensure_future(awaitable)
    if request is None:
        return await work
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watcher, work):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if watcher.done() and not watcher.cancelled():
        if work.done() and not work.cancelled() and work.exception() is None:
            result = work.result()
            if isinstance(result, UpstreamResponse):
                result.close()
        raise ClientGone("client disconnected before the response started")
    return work.result()


async def open_upstream(
    client: UpstreamClient,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes,
    method: str = "POST",
    timeout: aiohttp.ClientTimeout | None = None,
    first_byte_timeout_s: float | None = None,
    client_request: Request | None = None,
) -> UpstreamResponse:
    """Send a request upstream and return its response once the status and headers are in, body
    unread (the caller streams or closes it). Raises :class:`UpstreamError` chained from the
    transport error (see :func:`failure_kind`): 504 when it timed out (``first_byte_timeout_s``
    bounds the wait for the headers), 502 when it could not be reached or the connection broke;
    :class:`ClientGone` when ``client_request``'s client went away first (the upstream request is
    then cancelled)."""
    try:
        # No extra task: ``asyncio.timeout`` bounds the wait in this task (``wait_for`` made one
        # on Python 3.11), and only a ``client_request`` to watch costs a watcher (the raw-ASGI
        # generation path watches with one task per request instead: ``common.asgi``).
        async with asyncio.timeout(first_byte_timeout_s):
            sending = client.open(method, url, headers=headers, content=content, timeout=timeout)
            if client_request is None:
                return await sending
            return await unless_disconnected(client_request, sending)
    except TimeoutError as exc:  # aiohttp's connect and read timeouts are ones too
        raise UpstreamError(f"upstream {url} timed out: {exc!r}", status_code=504) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"upstream {url} is unreachable: {exc!r}") from exc


def stream_back(
    upstream: UpstreamResponse,
    url: str,
    on_close: Callable[[int], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> StreamingResponse:
    """Stream an open upstream response back unchanged (status, headers, bytes). The upstream
    response is closed when the stream ends, breaks, or the client goes away (Starlette then
    cancels the body; the close is synchronous, so that cancellation cannot skip it), and
    then ``on_close(upstream status)`` runs. ``on_chunk(bytes)`` sees each chunk as it arrives
    from upstream, before it is passed on (the coordinator times streams with it)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                if on_chunk is not None:
                    on_chunk(chunk)
                yield chunk
        except TRANSPORT_ERRORS as exc:
            # The stream broke midway: headers are gone already, so end the SSE stream with an
            # error event rather than a silent truncation.
            logger.warning("upstream stream from %s broke: %r", url, exc)
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                error = UpstreamError(f"upstream stream broke: {exc!r}").to_body()
                yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            upstream.close()
            if on_close is not None:
                on_close(upstream.status_code)

    return StreamingResponse(
        body(), status_code=upstream.status_code, headers=response_headers(upstream.headers)
    )


async def send_streaming(
    client: UpstreamClient,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes,
    method: str = "POST",
    timeout: aiohttp.ClientTimeout | None = None,
    on_close: Callable[[int], None] | None = None,
    client_request: Request | None = None,
) -> Response:
    """:func:`open_upstream` then :func:`stream_back`: one hop, no retry.

    ``on_close(status)`` runs exactly once when the exchange ends, however it ends (the upstream
    status; the error's status when upstream could not be reached; 499 when the client left
    before the response started), so callers can release what they hold.
    """
    try:
        upstream = await open_upstream(
            client,
            url,
            headers=headers,
            content=content,
            method=method,
            timeout=timeout,
            client_request=client_request,
        )
    except ServingError as exc:
        if on_close is not None:
            on_close(exc.status_code)
        raise
    return stream_back(upstream, url, on_close)


class Lifecycle:
    """Whether a server is draining: set on SIGTERM by :class:`DrainingServer`; ``/health`` then
    answers 503 ``{"status": "draining"}`` and new generation requests are refused with 503, while
    those in flight run to the end (up to the drain timeout)."""

    def __init__(self) -> None:
        self.draining = False

    def health(self) -> JSONResponse | None:
        """The draining answer for ``/health``, or None when serving normally."""
        return JSONResponse({"status": "draining"}, 503) if self.draining else None

    def check(self) -> None:
        if self.draining:
            raise NoEndpointError("the server is shutting down; retry on another instance")


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT first marking ``lifecycle`` draining.

    For ``drain_delay_s`` the server keeps listening: ``/health`` answers 503 draining and new
    generation requests 503, so load balancers and readiness probes see the server leave instead of
    meeting refused connections. Then uvicorn stops listening, lets in-flight requests finish for up
    to ``timeout_graceful_shutdown`` seconds (``drain_timeout_s``), cancels what is left, runs the
    lifespan shutdown and exits. A second signal skips what is left of the delay."""

    def __init__(
        self, config: uvicorn.Config, lifecycle: Lifecycle, drain_delay_s: float = 0.0
    ) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_delay_s = drain_delay_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining or self.drain_delay_s <= 0:
            self.lifecycle.draining = True
            super().handle_exit(sig, frame)
            return
        self.lifecycle.draining = True
        logger.warning(
            "draining: /health answers 503 for %.1fs, then new connections are refused and "
            "in-flight requests finish",
            self.drain_delay_s,
        )
        # uvicorn's handler only sets flags that its main loop polls, so a timer thread may call it.
        timer = threading.Timer(self.drain_delay_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def run_server(
    app: FastAPI,
    *,
    host: str,
    port: int,
    drain_timeout_s: float,
    drain_delay_s: float = 0.0,
    header_timeout_s: float | None = None,
    reuse_port: bool = False,
    own_port: int | None = None,
    **kwargs: Any,
) -> None:
    """Serve ``app`` (which holds a :class:`Lifecycle` as ``app.state.lifecycle``) until SIGTERM,
    then drain gracefully (see :class:`DrainingServer`). With ``header_timeout_s``, a connection
    that has not sent a complete request head that long after opening (or after the first byte
    of its next request) is closed (see :mod:`pd_runtime.common.header_deadline`).

    ``reuse_port``: ``port`` is opened with SO_REUSEPORT, so that replicas of this process share
    it; the kernel hashes each new connection to one of the live listeners, and a replica that
    exits takes only its own socket (and its accept queue) with it. ``own_port``: this process
    also listens there alone, so that health checks and metric scrapes reach this replica."""
    if header_timeout_s is not None:
        kwargs.setdefault("http", header_deadline_protocol(header_timeout_s))
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=int(drain_timeout_s) or 1, **kwargs
    )
    server = DrainingServer(config, app.state.lifecycle, drain_delay_s)
    if not reuse_port and own_port is None:
        server.run()
        return
    sockets = [listening_socket(host, port, reuse_port=reuse_port)]
    if own_port is not None:
        sockets.append(listening_socket(host, own_port))
    server.run(sockets=sockets)


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket for uvicorn (which listens on it); SO_REUSEPORT on request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
