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

__all__ = ["STATUS_FILE", "status_row", "write_status_file"]

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
