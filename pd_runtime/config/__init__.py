"""Typed configuration, parsed and validated once at each entry point.

``DeploymentConfig`` describes a whole deployment (what ``pd-runtime up`` reads);
``CoordinatorConfig`` is what one coordinator process needs (the launcher derives it).
"""

from __future__ import annotations

from pd_runtime.config.coordinator import CoordinatorConfig, SchedulerConfig
from pd_runtime.config.deployment import (
    DeploymentConfig,
    EngineConfig,
    ModelConfig,
    SidecarConfig,
    TransportConfig,
    WorkerGroupConfig,
)
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.config.loader import dump_yaml, load_config

__all__ = [
    "CoordinatorConfig",
    "DeploymentConfig",
    "EndpointConfig",
    "EngineConfig",
    "ModelConfig",
    "SchedulerConfig",
    "SidecarConfig",
    "TransportConfig",
    "WorkerGroupConfig",
    "dump_yaml",
    "load_config",
]
