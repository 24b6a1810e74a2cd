"""One log format for every pd-runtime process (the launcher sends each to RUN_DIR/NAME.log).

With ``queued=True`` (the coordinator) records are written off the event loop: the loggers'
handler is a :class:`logging.handlers.QueueHandler` that only puts the record on a queue, and a
:class:`logging.handlers.QueueListener` thread formats and writes it to stderr. The coordinator
logs one decision line per request; a blocking write of it on the loop delays every request when
stderr is slow (a full pipe, a busy disk). :func:`stop_logging` (also run at exit, before
logging's own shutdown) drains the queue, so no record is lost when the process ends on SIGTERM.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
from logging.handlers import QueueHandler, QueueListener

__all__ = [
    "LOG_FORMAT",
    "QUIET_LIBRARIES",
    "queued_handler",
    "setup_logging",
    "stop_logging",
    "uvicorn_log_config",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


#: Libraries whose INFO lines are per request and say nothing our own lines do not: httpx logs
#: every upstream call and every /metrics scrape, which measured 0.2-1.2 ms per hop of a request
#: (benchmarks/results/2026-11-24-components). They still log warnings.
QUIET_LIBRARIES = ("httpx", "httpcore")

_lock = threading.Lock()
_listener: QueueListener | None = None
_queue_handler: QueueHandler | None = None


def queued_handler() -> QueueHandler:
    """The process's queue handler (one, however often asked): records go to a listener thread
    that writes them to stderr in :data:`LOG_FORMAT`. Started on first use; see
    :func:`stop_logging`."""
    global _listener, _queue_handler
    with _lock:
        if _queue_handler is None or _listener is None:
            records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            target = logging.StreamHandler(sys.stderr)
            target.setFormatter(logging.Formatter(LOG_FORMAT))
            _queue_handler = QueueHandler(records)
            # The line is formatted in the listener thread; here only the message (and any
            # traceback) is rendered, and no basicConfig may give this handler LOG_FORMAT too.
            _queue_handler.setFormatter(logging.Formatter("%(message)s"))
            _listener = QueueListener(records, target, respect_handler_level=False)
            _listener.start()
        return _queue_handler


def stop_logging() -> None:
    """Write every queued record and stop the listener thread (a later record starts a new one)."""
    global _listener, _queue_handler
    with _lock:
        listener, _listener, _queue_handler = _listener, None, None
    if listener is not None:
        listener.stop()  # enqueues the sentinel and joins: everything before it is written
        for handler in listener.handlers:
            handler.flush()


# Registered after logging's own (which closes the handlers), so it runs before it.
atexit.register(stop_logging)


def setup_logging(level: str = "INFO", *, queued: bool = False) -> None:
    handlers: list[logging.Handler] | None = [queued_handler()] if queued else None
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, handlers=handlers)
    if logging.getLogger().level == logging.INFO:  # at DEBUG, let them speak
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_config(level: str = "INFO", *, queued: bool = False) -> dict[str, object]:
    """Uvicorn's own loggers in our format; access logs off (the coordinator logs its decisions).
    ``queued``: every record goes through :func:`queued_handler` (written off the event loop)."""
    handler: dict[str, object] = (
        {"()": queued_handler}
        if queued
        else {"class": "logging.StreamHandler", "formatter": "default"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }
