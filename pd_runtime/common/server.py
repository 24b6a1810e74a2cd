"""Server lifecycle: uvicorn with a graceful SIGTERM (:class:`DrainingServer`), the draining flag
the handlers read (:class:`Lifecycle`), and :func:`run_server`, which every server process calls.
"""

from __future__ import annotations

import logging
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from pd_runtime.common.header_deadline import header_deadline_protocol
from pd_runtime.errors import NoEndpointError

__all__ = [
    "DrainingServer",
    "Lifecycle",
    "listening_socket",
    "run_server",
]

logger = logging.getLogger(__name__)


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
