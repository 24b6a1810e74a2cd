"""KVEventsManager: one EventSubscriber per engine, added and removed while serving."""

from __future__ import annotations

from typing import Any

from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.kv_events.subscriber import EventSubscriber

__all__ = ["KVEventsManager"]


class KVEventsManager:
    """Owns the subscribers feeding one :class:`PrefixIndex`; use from one event loop.

    ``endpoint`` is the name the index and the scheduler know the engine by (e.g. its
    ``HOST:PORT``); ``address`` is its ZMQ PUB address. Removing an endpoint stops its subscriber
    and forgets its blocks, so the scheduler can no longer pick it for a prefix hit.
    ``subscriber_options`` (e.g. ``replay_timeout_s``, ``backoff_s``) go to every subscriber.
    """

    def __init__(self, index: PrefixIndex, **subscriber_options: Any) -> None:
        self.index = index
        self._options = subscriber_options
        self._subscribers: dict[str, EventSubscriber] = {}

    @property
    def subscribers(self) -> dict[str, EventSubscriber]:
        return dict(self._subscribers)

    async def add(
        self,
        endpoint: str,
        address: str,
        *,
        topic: str = "",
        replay_address: str | None = None,
        bind: bool = False,
    ) -> EventSubscriber:
        """Start subscribing; an endpoint already present is replaced (its blocks are kept only
        if the address is unchanged, since a new address is a different engine)."""
        old = self._subscribers.pop(endpoint, None)
        if old is not None:
            await old.stop()
            if old.address != address:
                self.index.clear(endpoint)
        sub = EventSubscriber(
            endpoint,
            address,
            self.index,
            topic=topic,
            replay_address=replay_address,
            bind=bind,
            **self._options,
        )
        self._subscribers[endpoint] = sub
        await sub.start()
        return sub

    async def remove(self, endpoint: str) -> None:
        """Stop the endpoint's subscriber and drop its blocks; unknown endpoints are ignored."""
        sub = self._subscribers.pop(endpoint, None)
        if sub is not None:
            await sub.stop()
        self.index.remove_endpoint(endpoint)

    async def stop(self) -> None:
        """Stop every subscriber (the index keeps its content)."""
        subs, self._subscribers = list(self._subscribers.values()), {}
        for sub in subs:
            await sub.stop()
