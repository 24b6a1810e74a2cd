"""The discovery seam: something that knows which endpoints exist right now.

Contract: ``start(on_change)`` begins discovering and returns once the first view is known (or
a bounded wait for it has passed); from then on ``on_change`` is awaited, on the caller's event
loop and never concurrently with itself, with the *whole* current set of discovered endpoints
each time it differs from the last set delivered (level-triggered: a consumer that diffs the set
against what it has cannot miss an add or a remove, and bursts are coalesced into the newest
set). An endpoint appears in the set only while it can serve (Kubernetes: the pod is Ready and
not terminating), so an unready endpoint is dropped as soon as the change is seen. When the
source is unreachable, the last known set stays (no callback) while discovery retries.
``stop`` ends all background work; ``on_change`` is not called after it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from pd_runtime.config.endpoint import EndpointConfig

__all__ = ["Discovery", "EndpointsCallback"]

EndpointsCallback = Callable[[list[EndpointConfig]], Awaitable[None]]


class Discovery(ABC):
    @abstractmethod
    async def start(self, on_change: EndpointsCallback) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @property
    @abstractmethod
    def endpoints(self) -> list[EndpointConfig]:
        """The last set delivered (or that would be delivered) to ``on_change``."""

    def debug_state(self) -> dict[str, Any]:
        return {"endpoints": [e.model_dump() for e in self.endpoints]}
