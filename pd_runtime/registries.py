"""Where configuration names meet the registries: checked once, when an entry point starts.

The config models (:mod:`pd_runtime.config`) sit below the packages that own the name-keyed
registries (scheduling policies, discovery sources, the sidecar's KV connectors), so a pydantic validator cannot ask those
registries without an import cycle. Instead every entry point loads its YAML through
:func:`load_checked`, which parses the model and then checks each registry-backed field here::

    scheduler.policy   -> pd_runtime.scheduling.registry.SCHEDULERS
    discovery.type     -> pd_runtime.discovery.registry.DISCOVERY
    sidecar.connector  -> pd_runtime.sidecar.connectors.CONNECTORS

An unknown name is a :class:`~pd_runtime.errors.ConfigError` naming the field and listing what is
registered, before anything starts. The CLI's ``choices=`` come from the same registries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pd_runtime.common.registry import Registry
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.deployment import DeploymentConfig
from pd_runtime.config.loader import load_config
from pd_runtime.discovery.registry import DISCOVERY
from pd_runtime.errors import ConfigError
from pd_runtime.scheduling.registry import SCHEDULERS
from pd_runtime.sidecar.connectors.base import CONNECTORS

__all__ = ["check_names", "load_checked", "named_fields"]

M = TypeVar("M", bound=BaseModel)


def named_fields(config: BaseModel) -> list[tuple[str, str, Registry[Any]]]:
    """``(field path, value, registry)`` for every registry-backed field of ``config``."""
    if isinstance(config, CoordinatorConfig):
        return [
            ("scheduler.policy", config.scheduler.policy, SCHEDULERS),
            ("discovery.type", config.discovery.type, DISCOVERY),
        ]
    if isinstance(config, DeploymentConfig):
        return [
            ("coordinator.scheduler.policy", config.coordinator.scheduler.policy, SCHEDULERS),
            ("sidecar.connector", config.sidecar.connector, CONNECTORS),
        ]
    return []


def check_names(config: M, source: str = "<config>") -> M:
    """Raise :class:`ConfigError` listing every registry-backed field whose name is unknown."""
    problems = [
        f"  {field}: unknown {registry.kind} {value!r}; choose one of: "
        f"{', '.join(registry.names())}"
        for field, value, registry in named_fields(config)
        if value not in registry
    ]
    if problems:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *problems]))
    return config


def load_checked(model: type[M], path: str | Path) -> M:
    """:func:`~pd_runtime.config.loader.load_config`, then :func:`check_names`."""
    return check_names(load_config(model, path), str(path))
