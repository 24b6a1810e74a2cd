"""Public model names -> what the workers serve: aliases, canary splits, the 404 for the rest.

::

    body.model ─▶ served name? ───────────────▶ as is
               ─▶ alias?       ─ one target  ─▶ that served name   (body rewritten)
                               ─ weighted    ─▶ one target, drawn by weight (a canary)
               ─▶ otherwise 404, listing every name a client may ask for

A served name is a pool's model or one of its LoRA adapters (which pool holds which is the
scheduler's business: :mod:`pd_runtime.scheduling.pools`). The draw uses one ``random.Random``
(seeded from ``canary_seed``), so tests can count the split.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import random
from collections.abc import Callable

import aiohttp

from pd_runtime.common.upstream import TRANSPORT_ERRORS, UpstreamClient
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.errors import NotFoundError
from pd_runtime.scheduling.base import Scheduler
from pd_runtime.scheduling.pools import PooledScheduler
from pd_runtime.scheduling.registry import SCHEDULERS

__all__ = ["ModelRouter", "build_scheduler", "watch_adapters"]

log = logging.getLogger("pd_runtime.coordinator")

_ASK_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
#: A worker that cannot answer (down, starting) or answers garbage: asked again next round.
_ASK_ERRORS: tuple[type[BaseException], ...] = (*TRANSPORT_ERRORS, ValueError, AttributeError)


class ModelRouter:
    """Resolves a request's ``model``. ``pooled``: the scheduler whose pools serve the names (it
    adds adapters it learns from the workers); none: the config's ``models``."""

    def __init__(self, config: CoordinatorConfig, pooled: PooledScheduler | None = None):
        self._pooled = pooled
        fixed = config.served_names
        self._served: Callable[[], list[str]] = (
            pooled.served_names if pooled is not None else lambda: fixed
        )
        self._cache: tuple[int, list[str], frozenset[str]] | None = None
        self._rng = random.Random(config.canary_seed)
        # alias -> (targets, cumulative weights)
        self._aliases: dict[str, tuple[list[str], list[float]]] = {}
        for name, target in config.aliases.items():
            if isinstance(target, str):
                self._aliases[name] = ([target], [1.0])
            else:
                weights = list(itertools.accumulate(t.weight for t in target))
                self._aliases[name] = ([t.model for t in target], weights)

    def _names(self) -> tuple[list[str], frozenset[str]]:
        """(every name a client may ask for, the served ones), rebuilt only when they change."""
        version = self._pooled.version if self._pooled is not None else 0
        if self._cache is None or self._cache[0] != version:
            served = self._served()
            names = [*served, *(a for a in self._aliases if a not in served)]
            self._cache = (version, names, frozenset(served))
        return self._cache[1], self._cache[2]

    @property
    def names(self) -> list[str]:
        """Every name a client may ask for: served names, then aliases."""
        return self._names()[0]

    def aliases(self) -> dict[str, list[str]]:
        return {name: targets for name, (targets, _) in self._aliases.items()}

    def resolve(self, model: str) -> str:
        """The served name for ``model``; NotFoundError (404) listing the names if none."""
        alias = self._aliases.get(model)
        if alias is not None:
            targets, cumulative = alias
            if len(targets) == 1:
                return targets[0]
            draw = self._rng.random() * cumulative[-1]
            return targets[bisect.bisect_right(cumulative, draw)]
        if model in self._names()[1]:
            return model
        raise NotFoundError(
            f"The model `{model}` does not exist. Models served here: {', '.join(self.names)}",
            param="model",
        )


def build_scheduler(config: CoordinatorConfig) -> Scheduler:
    """The config's policy over its endpoints; with ``pools``, one policy instance per pool (its
    own index, scorers and load) behind a :class:`PooledScheduler`."""
    if not config.pools:
        return SCHEDULERS.create(
            config.scheduler.policy, config.endpoints, **config.scheduler.params
        )
    schedulers: dict[str, Scheduler] = {}
    for pool in config.pools:
        chosen = pool.scheduler or config.scheduler
        schedulers[pool.model] = SCHEDULERS.create(chosen.policy, pool.endpoints, **chosen.params)
    return PooledScheduler(schedulers)


async def watch_adapters(
    scheduler: PooledScheduler, client: UpstreamClient, every_s: float
) -> None:
    """Ask every worker's ``/v1/models`` for its LoRA adapters, now and every ``every_s`` (a
    worker still starting, or down, is asked again next round)."""
    while True:
        for endpoint in scheduler.endpoints:
            try:
                answer = await client.fetch(
                    "GET", f"http://{endpoint.address}/v1/models", timeout=_ASK_TIMEOUT
                )
                data = answer.json().get("data", []) if answer.status_code == 200 else []
            except _ASK_ERRORS as exc:
                log.debug("adapters of %s: %r", endpoint.address, exc)
                continue
            new = scheduler.learn_adapters(endpoint.address, data)
            if new:
                log.info("endpoint %s serves adapters %s", endpoint.address, new)
        await asyncio.sleep(every_s)
