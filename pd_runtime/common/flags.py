"""Command-line flags generated from a typed settings model, and the argv that sets them back.

A setting is written once, as a pydantic field (type, default, bounds, description); from it come
the process's flag (``prefill_timeout_s`` -> ``--prefill-timeout``), its argparse type with the same
bounds, its help text and default, and the argv the launcher writes to start the process with a
given settings object::

    SidecarTuning.prefill_timeout_s: float = Field(120.0, gt=0, description="...")
        add_flags(parser, SidecarTuning)      -> --prefill-timeout SECONDS (> 0; default 120.0)
        to_argv(config.sidecar, SidecarTuning) -> ["--prefill-timeout", "60.0", ...]
        from_args(args, SidecarTuning)        -> {"prefill_timeout_s": 60.0, ...}

Scalar fields only (``str``, ``int``, ``float``); ``choices`` (e.g. from a registry) per field name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["add_flags", "flag_name", "from_args", "to_argv"]

_BOUNDS: tuple[tuple[type, str, Callable[[Any, Any], bool]], ...] = (
    (annotated_types.Gt, ">", lambda v, b: v > b),
    (annotated_types.Ge, ">=", lambda v, b: v >= b),
    (annotated_types.Lt, "<", lambda v, b: v < b),
    (annotated_types.Le, "<=", lambda v, b: v <= b),
)


def flag_name(field: str) -> str:
    """``prefill_timeout_s`` -> ``--prefill-timeout`` (the unit suffix goes into the metavar)."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def _parser(name: str, info: FieldInfo) -> Callable[[str], Any]:
    kind = info.annotation if info.annotation in (int, float) else str

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        for meta in info.metadata:
            for bound_type, op, holds in _BOUNDS:
                if isinstance(meta, bound_type):
                    bound = getattr(meta, type(meta).__name__.lower())
                    if not holds(value, bound):
                        raise argparse.ArgumentTypeError(f"must be {op} {bound}, not {text}")
        return value

    parse.__name__ = name  # argparse names the type in its error message
    return parse


def _metavar(name: str, info: FieldInfo, choices: Mapping[str, Sequence[str]] | None) -> str | None:
    if choices and name in choices:
        return None  # argparse shows the choices
    if name.endswith("_s"):
        return "SECONDS"
    return "N" if info.annotation in (int, float) else name.upper()


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One optional flag per field of ``model`` (dest: the field name), defaulting to the field's."""
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description or name} (default {default})"
        parser.add_argument(
            flag_name(name),
            dest=name,
            type=_parser(name, info),
            default=default,
            choices=(choices or {}).get(name),
            metavar=_metavar(name, info, choices),
            help=help_text.replace("%", "%%"),
        )


def from_args(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The parsed values of ``model``'s flags, as keyword arguments for the model."""
    return {name: getattr(args, name) for name in model.model_fields}


def to_argv(settings: BaseModel, model: type[BaseModel]) -> list[str]:
    """The flags that give a process ``settings`` (every field of ``model``, defaults included, so
    the command line shown by ``pd-runtime plan`` says everything)."""
    argv: list[str] = []
    for name in model.model_fields:
        argv += [flag_name(name), str(getattr(settings, name))]
    return argv
