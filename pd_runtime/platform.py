"""What kind of machine this is: GPUs (via NVML) or CPU only, and how many cores to pin.

Kept free of torch imports so that the launcher and coordinator start fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "PLATFORM_CHOICES",
    "Platform",
    "PlatformChoice",
    "UcxErrorHandling",
    "detect_platform",
    "resolve_platform",
]

PlatformName = Literal["cpu", "cuda"]
#: What a config or flag may ask for: a platform, or "auto" (detect it).
PlatformChoice = Literal["auto", "cpu", "cuda"]
PLATFORM_CHOICES: tuple[str, ...] = get_args(PlatformChoice)
#: NIXL's UCX ``ucx_error_handling_mode``: ``peer`` detects dead peers (a TCP connection per pair),
#: ``none`` lets workers on one host use shared memory only.
UcxErrorHandling = Literal["peer", "none"]


@dataclass(frozen=True)
class Platform:
    name: PlatformName
    gpu_count: int
    cpu_cores: tuple[int, ...]


def _gpu_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types when no driver is loaded
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def detect_platform() -> Platform:
    gpus = _gpu_count()
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return Platform("cuda" if gpus else "cpu", gpus, cores)


def resolve_platform(requested: str) -> PlatformName:
    if requested in get_args(PlatformName):
        return requested  # type: ignore[return-value]
    return detect_platform().name
