"""``static``: the endpoints written in the config, fixed for the life of the process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.discovery.base import Discovery, EndpointsCallback

__all__ = ["StaticDiscovery"]


class StaticDiscovery(Discovery):
    """Nothing to discover: the scheduler is built with these endpoints, so ``on_change`` is
    never called (there is never a set different from the first)."""

    def __init__(
        self, config: DiscoveryConfig, endpoints: Sequence[EndpointConfig] = (), **_: Any
    ) -> None:
        self.config = config
        self._endpoints = list(endpoints)

    async def start(self, on_change: EndpointsCallback) -> None:
        return None

    async def stop(self) -> None:
        return None

    @property
    def endpoints(self) -> list[EndpointConfig]:
        return list(self._endpoints)
