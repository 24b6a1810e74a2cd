"""The pooled upstream client (aiohttp) and how its failures are named.

The upstream hop is aiohttp (its HTTP parser is in C): with httpx, the pure-Python HTTP client took
about half of the sidecar's CPU per request (``benchmarks/results/2026-11-24-components``).
:func:`~pd_runtime.common.streaming.open_upstream` translates these failures into ours.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

__all__ = [
    "TRANSPORT_ERRORS",
    "Fetched",
    "UpstreamClient",
    "UpstreamResponse",
    "failure_kind",
    "make_client",
    "upstream_timeout",
]

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
