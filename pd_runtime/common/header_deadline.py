"""A deadline for the request head: uvicorn's HTTP protocols with a header-read timeout.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but gives a client all the
time it wants to finish a request head, and none at all to a connection that never sends a byte:
800 connections that sent half a header were all still open 20 s later, the start of a slowloris
that ends in file descriptor exhaustion. :func:`header_deadline_protocol` subclasses uvicorn's
protocol so that a connection must send a complete request head within ``header_timeout_s``:

* of being opened, and
* of the first byte of each further request on a kept-alive connection (the idle time between
  requests stays uvicorn's ``timeout_keep_alive``).

When the head is complete the timer is cancelled, so a client that sends its head and then
trickles a large body is not cut by it (the body and the response are the application's
business). When the timer fires, a client that had started a head gets ``408 Request Timeout``
(``Connection: close``) and the connection is closed; one that sent nothing is just closed. If a
response is still being written on that connection (a pipelined second head left half-sent), it
is allowed to finish and the connection closes after it.

The httptools variant also gives each request a :class:`~pd_runtime.common.asgi.DisconnectHook`
(scope extension ``pd.disconnect``), fired when the connection is lost before the response is
complete: the generation routes learn that their client left without a task per request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pd_runtime.common.asgi import DISCONNECT_HOOK, DisconnectHook

__all__ = ["header_deadline_protocol"]

_TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "message": "the request head was not received in time",
            "type": "RequestTimeoutError",
            "param": None,
            "code": 408,
        }
    }
).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class _HeaderDeadline:
    """The timer, shared by the h11 and httptools variants (mixed in before uvicorn's class)."""

    header_timeout_s: float
    # From uvicorn's protocol classes.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    _header_timer: asyncio.TimerHandle | None = None
    _head_started = False

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        self._head_started = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still going out; close once it is done instead of cutting it.
            self.cycle.keep_alive = False
            return
        if self._head_started:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        cycle = self.cycle
        super().connection_lost(exc)  # type: ignore[misc]
        if cycle is not None and cycle.disconnected:  # uvicorn's mark: lost mid-response
            hook = cycle.scope.get("extensions", {}).get(DISCONNECT_HOOK)
            if hook is not None:
                hook.fire()


class _H11HeaderDeadline(_HeaderDeadline, H11Protocol):
    """h11 reports a request only once its head is complete: until then the peer's state is IDLE."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._check_head()  # a pipelined, half-sent next head may be waiting in the buffer

    def _check_head(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            if self.conn.trailing_data[0]:
                self._head_started = True
                self._arm_header_timer()
        else:
            self._cancel_header_timer()


def _httptools_variant() -> type[asyncio.Protocol] | None:
    if importlib.util.find_spec("httptools") is None:
        return None
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HttpToolsHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
        """llhttp calls on_message_begin at a request's first byte, on_headers_complete at its
        head's end."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_started = True
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            # Before uvicorn starts the request: the app finds its disconnect hook in the scope
            # (``common.asgi.ClientWatch``), so no task per request has to await receive().
            extensions: dict[Any, Any] = self.scope.setdefault("extensions", {})
            extensions[DISCONNECT_HOOK] = DisconnectHook()
            super().on_headers_complete()

    return _HttpToolsHeaderDeadline


def header_deadline_protocol(
    header_timeout_s: float, implementation: str = "auto"
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class (for ``uvicorn.Config(http=...)``) closing connections
    that have not sent a complete request head within ``header_timeout_s``. ``implementation``:
    ``auto`` (httptools when installed, as uvicorn picks), ``httptools`` or ``h11``."""
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be > 0, not {header_timeout_s!r}")
    base: type[asyncio.Protocol] | None = _H11HeaderDeadline
    if implementation in ("auto", "httptools"):
        base = _httptools_variant()
        if base is None:
            if implementation == "httptools":
                raise ValueError("httptools is not installed")
            base = _H11HeaderDeadline
    elif implementation != "h11":
        raise ValueError(f"unknown HTTP implementation {implementation!r}")
    assert base is not None
    return type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s)})
