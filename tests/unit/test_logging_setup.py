from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pd_runtime.logging_setup import QUIET_LIBRARIES, setup_logging


@pytest.fixture
def fresh_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (
        root.level,
        list(root.handlers),
        {n: logging.getLogger(n).level for n in QUIET_LIBRARIES},
    )
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("fresh_logging")
def test_per_request_library_lines_are_quiet_at_info_but_not_at_debug() -> None:
    logging.getLogger().handlers.clear()  # basicConfig configures only a bare root (pytest's own
    setup_logging("info")  # capture handlers are added after fixtures, hence here)
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("pd_runtime.a_logger_nobody_configured").getEffectiveLevel() == (
        logging.INFO
    )
    logging.getLogger().handlers.clear()
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)
    setup_logging("debug")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG
