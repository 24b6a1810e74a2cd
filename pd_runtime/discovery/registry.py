"""Discovery sources by name; lazy, so ``static`` never imports the Kubernetes client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pd_runtime.common.registry import Registry

if TYPE_CHECKING:
    from pd_runtime.config.discovery import DiscoveryConfig
    from pd_runtime.config.endpoint import EndpointConfig
    from pd_runtime.discovery.base import Discovery

__all__ = ["DISCOVERY", "create_discovery"]

DISCOVERY: Registry[Discovery] = Registry("discovery type")
DISCOVERY.register("static", "pd_runtime.discovery.static:StaticDiscovery")
DISCOVERY.register("kubernetes", "pd_runtime.discovery.kubernetes:KubernetesDiscovery")


def create_discovery(
    config: DiscoveryConfig, endpoints: Sequence[EndpointConfig] = (), **options: Any
) -> Discovery:
    """``endpoints``: the config's fixed list (what ``static`` serves)."""
    return DISCOVERY.create(config.type, config, endpoints, **options)
