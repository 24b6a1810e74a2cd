"""What a workload is: a seeded list of conversations, each a sequence of turns.

A single-turn workload (random lengths, shared prefix, long-document Q&A) makes one-turn
conversations; multi-turn chat makes conversations whose turns are sent one after another, each
extending the previous messages with the model's answer. The runner schedules *conversations*
(Poisson arrivals or closed-loop slots) and sends a conversation's turns in order.

Workloads are registered by name (``WORKLOADS``); the CLI's ``--workload`` choices come from it and
``--param key=value`` goes to the workload's constructor.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from pd_runtime.bench.textgen import TextGen

__all__ = ["WORKLOADS", "Conversation", "Turn", "Workload", "make_workload"]

Api = Literal["completions", "chat"]


@dataclass(frozen=True)
class Turn:
    text: str  # the prompt (completions) or the user message (chat)
    max_tokens: int


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    api: Api = "completions"
    system: str | None = None  # chat only: the system message
    session: str | None = None  # sent as the x-session-id header
    group: str | None = None  # e.g. the shared prefix or document it uses (for reports)


class Workload(ABC):
    """Builds conversations from a seed. Parameters are keyword arguments with defaults; the same
    (parameters, seed, n) must give the same conversations."""

    name: str = ""

    @abstractmethod
    def build(self, rng: random.Random, text: TextGen, n_requests: int) -> list[Conversation]:
        """About ``n_requests`` requests in all (turns summed over conversations)."""

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class _Registry:
    """Name -> "module:Class", imported on first use; a miss lists the known names."""

    def __init__(self) -> None:
        self._targets: dict[str, str] = {}

    def register(self, name: str, target: str) -> None:
        if name in self._targets:
            raise ValueError(f"workload {name!r} is already registered")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def get(self, name: str) -> type[Workload]:
        try:
            module, cls = self._targets[name].split(":")
        except KeyError:
            known = ", ".join(self.names())
            raise KeyError(f"unknown workload {name!r}; choose one of: {known}") from None
        return getattr(importlib.import_module(module), cls)


WORKLOADS = _Registry()
for _name, _module in (
    ("random", "random_lengths:RandomLengths"),
    ("shared-prefix", "shared_prefix:SharedPrefix"),
    ("multi-turn", "multi_turn:MultiTurn"),
    ("long-doc", "long_doc:LongDocQA"),
):
    WORKLOADS.register(_name, f"pd_runtime.bench.workloads.{_module}")


def _coerce(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def make_workload(name: str, params: dict[str, Any] | None = None) -> Workload:
    """The named workload with ``params`` (strings from the command line are coerced to the type
    of the field's default; unknown keys are an error naming the known ones)."""
    cls = WORKLOADS.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in (params or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise KeyError(f"workload {name!r} has no parameter {key!r}; known: {sorted(fields)}")
        default = fields[key].default
        kwargs[key] = _coerce(value, default) if isinstance(value, str) else value
    return cls(**kwargs)


def jitter(rng: random.Random, mean: int, ratio: float) -> int:
    """A length uniform in [mean*(1-ratio), mean*(1+ratio)], at least 1."""
    lo, hi = int(mean * (1 - ratio)), int(mean * (1 + ratio))
    return max(1, rng.randint(lo, hi) if hi > lo else mean)
