"""One log format for every pd-runtime process (the launcher sends each to RUN_DIR/NAME.log)."""

from __future__ import annotations

import logging

__all__ = ["LOG_FORMAT", "QUIET_LIBRARIES", "setup_logging", "uvicorn_log_config"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


#: Libraries whose INFO lines are per request and say nothing our own lines do not: httpx logs
#: every upstream call and every /metrics scrape, which measured 0.2-1.2 ms per hop of a request
#: (benchmarks/results/2026-11-24-components). They still log warnings.
QUIET_LIBRARIES = ("httpx", "httpcore")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    if logging.getLogger().level == logging.INFO:  # at DEBUG, let them speak
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_config(level: str = "INFO") -> dict[str, object]:
    """Uvicorn's own loggers in our format; access logs off (the coordinator logs its decisions)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }
