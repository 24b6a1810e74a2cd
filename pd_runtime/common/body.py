"""The client's side of a request: its body (bounded, 413/400 by the same rules everywhere), its JSON,
and whether the client is still there.

If the client goes away before the response starts, :func:`unless_disconnected` cancels the
upstream call, so the worker sees the disconnect and aborts the request instead of generating into
the void. (That is the FastAPI paths'; the generation paths are plain ASGI,
:mod:`pd_runtime.common.asgi`, told by the connection when the client leaves: no task.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from pd_runtime.common.upstream import UpstreamResponse
from pd_runtime.errors import BadRequestError, ClientGone, PayloadTooLargeError

__all__ = [
    "parse_json_body",
    "read_body",
    "refuse_declared_length",
    "unless_disconnected",
]

T = TypeVar("T")


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
