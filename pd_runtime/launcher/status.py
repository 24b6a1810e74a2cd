"""``RUN_DIR/status.json``: each part's state as ``up`` sees it, for people and tests.

Written by both launchers about every second while the deployment serves (atomically: a reader
never sees half a file), read by ``pd-runtime status``. One row per part::

    {"name", "kind", "url", "state": running|restarting|crash-looping|stopped, "healthy",
     "pid", "restarts", "recent_restarts" (within the crash-loop window), "last_exit", "log"}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pd_runtime.config.launcher import RestartConfig
from pd_runtime.launcher.supervisor import PartStatus
from pd_runtime.launcher.topology import PartSpec

__all__ = ["STATUS_FILE", "render_status", "status_row", "write_status_file"]

STATUS_FILE = "status.json"


def status_row(spec: PartSpec, status: PartStatus, healthy: bool) -> dict[str, Any]:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "url": spec.url,
        "state": status.state,
        "healthy": healthy and status.alive,
        "pid": status.pid,
        "restarts": status.restarts,
        "recent_restarts": status.recent_restarts,
        "last_exit": status.last_exit,
        "log": status.log_path,
    }


def write_status_file(
    run_dir: Path, gateway: str, restarts: RestartConfig, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    status = {
        "updated": time.time(),
        "pid": os.getpid(),
        "gateway": gateway,
        "crash_loop": {"max_restarts": restarts.max_restarts, "window_s": restarts.window_s},
        "parts": rows,
    }
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(path)
    return status


def render_status(status: dict[str, Any], now: float) -> tuple[str, bool]:
    """The table ``pd-runtime status`` prints, and whether all is well: False when ``up`` stopped
    writing the file (more than 10 s old) or a part crash-loops."""
    age = now - float(status["updated"])
    stale = age > 10
    lines = [
        f"gateway {status['gateway']}  (up pid {status['pid']}, updated {age:.0f}s ago"
        + (": STALE, `up` is not running" if stale else "")
        + ")"
    ]
    rows = [("PART", "KIND", "STATE", "HEALTHY", "PID", "RESTARTS", "LAST EXIT", "URL")]
    for part in status["parts"]:
        rows.append(
            (
                part["name"],
                part["kind"],
                part["state"],
                "yes" if part["healthy"] else "no",
                str(part["pid"] or "-"),
                f"{part['restarts']} ({part['recent_restarts']} recent)",
                "-" if part["last_exit"] is None else str(part["last_exit"]),
                part["url"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    looping = any(p["state"] == "crash-looping" for p in status["parts"])
    return "\n".join(lines), not (stale or looping)
