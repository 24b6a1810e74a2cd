"""Test helper: the OS's headless Chromium driven by Selenium through its chromedriver (Debian's
``chromium`` and ``chromium-driver``; ``make browser`` installs them). Nothing is downloaded:
Selenium Manager is kept offline and Chromium's background services are off, so it neither
hangs on the closed network nor phones home.

Without the browser the tests that need it fail where it could be installed (root with apt-get)
or under CI (``CI=true``); they skip, saying why, only on a machine that cannot install it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("PD_RUNTIME_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PD_RUNTIME_CHROMEDRIVER", "/usr/bin/chromedriver"))

_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in the test containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1500,1300",
)


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return (
                f"{path} is missing: run `make browser` (apt-get install chromium chromium-driver)"
            )
    return None


def _can_install() -> bool:
    """What ``make browser`` needs to install Chromium: root and apt-get."""
    import shutil

    return os.geteuid() == 0 and shutil.which("apt-get") is not None


@contextmanager
def chromium() -> Iterator[Any]:
    """A fresh headless Chromium (its own profile directory) with the console log recorded."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true" or _can_install():
            # Under CI the bootstrap must have installed it; where `make browser` could have
            # (root, apt-get present), a missing browser is a setup error, not a reason to skip.
            pytest.fail(f"the browser tests need Chromium: {missing}", pytrace=False)
        pytest.skip(
            "the dashboard's browser tests need headless Chromium, which this machine cannot "
            f"install (not root, or no apt-get; under CI=true this fails instead): {missing}"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="pd-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's SEVERE entries since the last call (script errors, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``condition`` (which may raise while the page renders) until it is truthy; return the
    seconds it took."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout_s:
        try:
            if condition():
                return time.monotonic() - started
        except Exception as exc:  # an element not rendered yet
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what} (last error: {last})")
