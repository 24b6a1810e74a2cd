"""Scheduling policies by name; lazy so that choosing one does not import the others."""

from __future__ import annotations

from pd_runtime.common.registry import Registry
from pd_runtime.scheduling.base import Scheduler

__all__ = ["SCHEDULERS"]

SCHEDULERS: Registry[Scheduler] = Registry("scheduling policy")
SCHEDULERS.register("round-robin", "pd_runtime.scheduling.round_robin:RoundRobinScheduler")
SCHEDULERS.register("kv-aware", "pd_runtime.scheduling.kv_aware:KVAwareScheduler")
