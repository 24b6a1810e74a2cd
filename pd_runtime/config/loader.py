"""YAML → pydantic model, with errors that name the field (``decode.replicas: ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pd_runtime.errors import ConfigError

__all__ = ["dump_yaml", "format_validation_error", "load_config", "parse_config"]

M = TypeVar("M", bound=BaseModel)


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "<root>"
        message = err["msg"].removeprefix("Value error, ")
        # Model-level validators already start their message with the field they blame.
        lines.append(f"  {message}" if field == "<root>" else f"  {field}: {message}")
    return "\n".join(lines)


def parse_config(model: type[M], data: Any, source: str = "<config>") -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def load_config(model: type[M], path: str | Path) -> M:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(model, data, str(path))


def dump_yaml(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
