"""The coordinator's outer ASGI layer: API-key authentication, then admission control.

::

    request ──▶ /health, /metrics, the dashboard page? ─────────────────▶ app
                    │ other paths
                    ▼
                API keys on and no valid 'Authorization: Bearer KEY'? ──▶ 401
                    │
                    ▼
                POST to a generation path? ──no───────────────────────▶ app
                    │ yes
                    ▼
                x-request-priority an integer? ──no──────────────────▶ 400
                    │
                    ▼
                admission.acquire(priority) ──RateLimitError──────────▶ 429 + Retry-After
                    │   (while queued, the body is read ahead into a buffer: a client that
                    │    leaves gives its place up at once and is counted as client_gone)
                    │
                    ▼
                app (body, validation, scheduling, streaming) ... release the slot when the
                response has ended, however it ended

It wraps the whole ASGI call rather than a handler, so a slot is held until the last byte of a
streamed answer is sent (or the client goes away), not just until the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pd_runtime.common.asgi import request_headers
from pd_runtime.common.headers import GENERATION_PATHS
from pd_runtime.common.openai_errors import error_response
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.coordinator.admission import AdmissionController
from pd_runtime.coordinator.dashboard import PAGE_PATHS
from pd_runtime.coordinator.metrics import CoordinatorMetrics
from pd_runtime.errors import (
    AuthenticationError,
    BadRequestError,
    ClientGone,
    ConfigError,
    RateLimitError,
    ServingError,
)

__all__ = [
    "ADMITTED_KEY",
    "ARRIVED_KEY",
    "OPEN_PATHS",
    "PRIORITY_HEADER",
    "ApiKeys",
    "GatewayMiddleware",
    "resolve_api_keys",
]

PRIORITY_HEADER = "x-request-priority"
#: With tracing on (``timed``), when a generation request arrived and when it got its admission
#: slot (``time.time_ns()``), left in the ASGI scope for the handler's ``coordinator.admission``.
ARRIVED_KEY = "pd_runtime.arrived_ns"
ADMITTED_KEY = "pd_runtime.admitted_ns"
#: Served without a key: probes, Prometheus, and the dashboard's static page (it holds no data;
#: its ``/dashboard/state``, which names every endpoint, needs a key like any other path).
OPEN_PATHS = frozenset({"/health", "/metrics", *PAGE_PATHS})


def resolve_api_keys(
    config: CoordinatorConfig, environ: Mapping[str, str] = os.environ
) -> list[str]:
    """The configured keys plus those in ``config.api_keys_env`` (comma-separated)."""
    keys = [key.get_secret_value() for key in config.api_keys]
    if config.api_keys_env is not None:
        from_env = [k.strip() for k in environ.get(config.api_keys_env, "").split(",")]
        from_env = [k for k in from_env if k]
        if not from_env:
            raise ConfigError(
                f"api_keys_env: environment variable {config.api_keys_env} is unset or empty"
            )
        keys += from_env
    return keys


class ApiKeys:
    """Checks bearer tokens in constant time. Keys are kept only as SHA-256 digests, and every key
    is compared on every check, so neither the length nor the position of a match leaks."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise ``AuthenticationError`` unless ``authorization`` is ``Bearer <a valid key>``."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer YOUR_KEY'."
            )
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        matches = [hmac.compare_digest(given, digest) for digest in self._digests]
        if not any(matches):
            raise AuthenticationError("Incorrect API key provided.")


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        admission: AdmissionController,
        metrics: CoordinatorMetrics,
        max_body_bytes: int = 10 * 1024 * 1024,
        timed: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.admission = admission
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.timed = timed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)  # decoded once: the generation handler reuses them
        try:
            if self.keys.enabled:
                self.keys.check(headers.get("authorization"))
            admit = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
            if admit:
                if self.timed:  # tracing: the handler's span starts at arrival
                    scope[ARRIVED_KEY] = time.time_ns()
                priority = _priority(headers.get(PRIORITY_HEADER))
                if self.admission.slot_free:
                    await self.admission.acquire(priority)  # returns at once
                else:
                    receive = await self._queue(priority, receive)
                if self.timed:
                    scope[ADMITTED_KEY] = time.time_ns()
        except ClientGone:
            self.metrics.rejections.labels("client_gone").inc()
            return  # nobody is there to answer
        except ServingError as exc:
            if isinstance(exc, RateLimitError):
                self.metrics.rejections.labels(exc.reason).inc()
            self.metrics.errors.labels(exc.error_type).inc()
            await error_response(exc)(scope, receive, send)
            return
        if not admit:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()

    async def _queue(self, priority: int, receive: Receive) -> Receive:
        """Wait for a slot while reading the body ahead, so that a client that leaves is seen at
        once (its place goes to the next request) instead of after ``queue_timeout_s``. Returns
        the ``receive`` the app must use: the buffered messages first, then the connection's."""
        buffered: list[Message] = []
        slot = asyncio.ensure_future(self.admission.acquire(priority))
        watcher = asyncio.ensure_future(self._read_ahead(receive, buffered))
        try:
            await asyncio.wait({slot, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if watcher.done() and not watcher.cancelled():  # the client left
            if slot.done():
                if slot.exception() is None:
                    self.admission.release()
            else:
                slot.cancel()  # gives the place in the queue up
                with contextlib.suppress(asyncio.CancelledError):
                    await slot
            raise ClientGone("client disconnected while queued")
        slot.result()  # a RateLimitError from the queue propagates

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        return replay

    async def _read_ahead(self, receive: Receive, buffered: list[Message]) -> None:
        """Buffer body messages until the client disconnects (then return). Past
        ``max_body_bytes`` it stops reading and leaves the 413 to the app."""
        size = 0
        while size <= self.max_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            buffered.append(message)
            size += len(message.get("body", b""))
        await asyncio.Event().wait()  # until cancelled


def _priority(value: str | None) -> int:
    if value is None or not value.strip():
        return 0
    try:
        return int(value.strip())
    except ValueError:
        raise BadRequestError(
            f"header {PRIORITY_HEADER} must be an integer, got {value[:40]!r}"
        ) from None
