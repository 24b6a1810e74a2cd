"""Command-line flags generated from a typed settings model, and the argv that sets them back.

A setting is written once, as a pydantic field (type, default, bounds, description); from it come
the process's flag (``prefill_timeout_s`` -> ``--prefill-timeout``), its argparse type with the same
bounds, its help text and default, and the argv the launcher writes to start the process with a
given settings object::

    SidecarTuning.prefill_timeout_s: float = Field(120.0, gt=0, description="...")
        add_flags(parser, SidecarTuning)      -> --prefill-timeout SECONDS (> 0; default 120.0)
        to_argv(config.sidecar, SidecarTuning) -> ["--prefill-timeout", "60.0", ...]
        from_args(args, SidecarTuning)        -> {"prefill_timeout_s": 60.0, ...}

Fields: ``str``, ``int``, ``float``, each optionally ``| None`` (the flag may be left out), a
``Literal`` (its values are the choices), or ``bool`` (``--x`` / ``--no-x``); a field without a
default is a required flag. ``choices`` (e.g. from a registry) per field name; ``only`` /
``names`` pick and rename fields where a process's flags predate its settings (``kv_lease_s`` is
``--kv-lease``, ``gpu_ids`` could be ``--gpus``); ``parser`` may be an argument group.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

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


def _scalar(info: FieldInfo) -> Any:
    """The field's type without ``| None``."""
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else str
    return annotation


def _literal_choices(info: FieldInfo) -> list[str] | None:
    scalar = _scalar(info)
    return [str(v) for v in get_args(scalar)] if get_origin(scalar) is Literal else None


def _parser(name: str, info: FieldInfo) -> Callable[[str], Any]:
    scalar = _scalar(info)
    kind = scalar if scalar in (int, float) else str

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


def _metavar(
    name: str, info: FieldInfo, choices: Mapping[str, Sequence[str]] | None, flag: str
) -> str | None:
    if (choices and name in choices) or _literal_choices(info):
        return None  # argparse shows the choices
    if name.endswith("_s"):
        return "SECONDS"
    return (
        "N" if _scalar(info) in (int, float) else flag.removeprefix("--").replace("-", "_").upper()
    )


def _fields(model: type[BaseModel], only: Iterable[str] | None) -> list[tuple[str, FieldInfo]]:
    fields = model.model_fields
    return [(name, fields[name]) for name in (fields if only is None else only)]


def add_flags(
    parser: argparse._ActionsContainer,
    model: type[BaseModel],
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    only: Iterable[str] | None = None,
    names: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of ``model`` (or of ``only``; dest: the field name), defaulting to the
    field's (or to ``defaults``, where a command starts from other values than the model's)."""
    for name, info in _fields(model, only):
        flag = (names or {}).get(name) or flag_name(name)
        required = info.is_required() and name not in (defaults or {})
        default = None if required else info.get_default(call_default_factory=True)
        default = (defaults or {}).get(name, default)
        description = info.description or name
        # A None default is explained by the description ("default: auto-detect"), if at all.
        silent = required or (default is None and "default" in description.lower())
        shown = "" if silent else f" (default {default})"
        help_text = f"{description}{shown}".replace("%", "%%")
        if _scalar(info) is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag,
            dest=name,
            type=_parser(name, info),
            default=default,
            required=required,
            choices=(choices or {}).get(name) or _literal_choices(info),
            metavar=_metavar(name, info, choices, flag),
            help=help_text,
        )


def from_args(
    args: argparse.Namespace, model: type[BaseModel], only: Iterable[str] | None = None
) -> dict[str, Any]:
    """The parsed values of ``model``'s flags, as keyword arguments for the model."""
    return {name: getattr(args, name) for name, _ in _fields(model, only)}


def to_argv(
    settings: BaseModel,
    model: type[BaseModel],
    *,
    only: Iterable[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """The flags that give a process ``settings`` (every field of ``model``, defaults included, so
    the command line shown by ``pd-runtime plan`` says everything; a ``None`` is left out)."""
    argv: list[str] = []
    for name, _ in _fields(model, only):
        flag, value = (names or {}).get(name) or flag_name(name), getattr(settings, name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv
