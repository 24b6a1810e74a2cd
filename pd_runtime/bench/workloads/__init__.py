"""One module per workload; registered by name in ``pd_runtime.bench.workload.WORKLOADS``."""

from __future__ import annotations

__all__: list[str] = []
