"""Endpoint discovery: where the coordinator's endpoint set comes from (static list, Kubernetes)."""

from __future__ import annotations

from pd_runtime.discovery.base import Discovery, EndpointsCallback
from pd_runtime.discovery.registry import DISCOVERY, create_discovery

__all__ = ["DISCOVERY", "Discovery", "EndpointsCallback", "create_discovery"]
