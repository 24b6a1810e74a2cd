"""HTTP plumbing shared by the coordinator and the sidecar: header hygiene, streaming pass-through,
and OpenAI-format error responses.

Responses from upstream are streamed byte for byte (SSE included). If the client goes away, the
response generator is cancelled and its ``finally`` closes the upstream response, so the worker
sees the disconnect and aborts the request instead of generating into the void.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pd_runtime.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ServingError,
    UpstreamError,
    openai_error_body,
)

__all__ = [
    "GENERATION_PATHS",
    "PREFILLER_HEADER",
    "REQUEST_ID_HEADER",
    "error_response",
    "forward_headers",
    "install_error_handlers",
    "make_client",
    "parse_json_body",
    "read_body",
    "send_streaming",
]

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


def forward_headers(
    headers: Mapping[str, str], *, drop: frozenset[str] = frozenset()
) -> dict[str, str]:
    return {
        k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST and k.lower() not in drop
    }


def make_client(connect_timeout_s: float, read_timeout_s: float) -> httpx.AsyncClient:
    """A pooled client; one per process, reused by every request."""
    timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) one over ``max_bytes`` before reading it whole: a declared
    ``Content-Length`` over the limit is refused unread, and a chunked body is counted as it
    arrives, so at most ``max_bytes`` (plus one chunk) is ever held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequestError("invalid Content-Length header") from None
        if length > max_bytes:
            raise PayloadTooLargeError(
                f"request body of {length} bytes is over the limit of {max_bytes} bytes"
            )
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


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers over Python's 4300-digit limit;
        # RecursionError, nesting deeper than the decoder allows.
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


async def send_streaming(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes,
    method: str = "POST",
    timeout: httpx.Timeout | None = None,
    on_close: Callable[[int], None] | None = None,
) -> Response:
    """Send a request upstream and stream its response back unchanged (status, headers, bytes).

    ``on_close(status)`` runs exactly once when the exchange ends, however it ends (the upstream
    status, or 502/504 when upstream could not be reached), so callers can release what they hold.
    """
    closed = False

    def close(status: int) -> None:
        nonlocal closed
        if on_close is not None and not closed:
            closed = True
            on_close(status)

    request = client.build_request(
        method, url, headers=headers, content=content, timeout=timeout or client.timeout
    )
    try:
        upstream = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        close(504)
        raise UpstreamError(f"upstream {url} timed out: {exc!r}", status_code=504) from exc
    except httpx.HTTPError as exc:
        close(502)
        raise UpstreamError(f"upstream {url} is unreachable: {exc!r}") from exc

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            # The stream broke midway: headers are gone already, so end the SSE stream with an
            # error event rather than a silent truncation.
            logger.warning("upstream stream from %s broke: %r", url, exc)
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                error = UpstreamError(f"upstream stream broke: {exc!r}").to_body()
                yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            await upstream.aclose()
            close(upstream.status_code)

    response_headers = {
        k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
    }
    return StreamingResponse(body(), status_code=upstream.status_code, headers=response_headers)
