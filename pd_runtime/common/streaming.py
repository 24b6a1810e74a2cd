"""One proxy hop: open the upstream request, then stream its answer back byte for byte (SSE
included). Once the answer streams, a client that goes away makes Starlette cancel the body, and
its ``finally`` closes upstream (synchronously, so the cancellation cannot skip it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pd_runtime.common.body import unless_disconnected
from pd_runtime.common.headers import response_headers
from pd_runtime.common.upstream import TRANSPORT_ERRORS, UpstreamClient, UpstreamResponse
from pd_runtime.errors import ServingError, UpstreamError

__all__ = [
    "open_upstream",
    "send_streaming",
    "stream_back",
]

logger = logging.getLogger(__name__)


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
        # generation path is told by the connection instead: ``common.asgi.ClientWatch``).
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
