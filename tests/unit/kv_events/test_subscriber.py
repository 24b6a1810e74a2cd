"""EventSubscriber and KVEventsManager against real ZMQ sockets on loopback."""

from __future__ import annotations

import asyncio

from pd_runtime.kv_events import EventSubscriber, KVEventsManager, PrefixIndex
from tests.servers import until

from .publisher import FakePublisher
from .test_index import BS, PROMPT, keys, stored


async def prime(pub: FakePublisher, sub: EventSubscriber) -> None:
    """Send empty batches until one arrives: SUB drops what is sent before it has subscribed."""
    start = sub.stats.batches
    while sub.stats.batches == start:
        await pub.send([])
        await asyncio.sleep(0.02)


async def test_events_are_applied() -> None:
    pub, ix = FakePublisher(), PrefixIndex()
    sub = EventSubscriber("a", pub.address, ix, topic="kv@")
    await sub.start()
    try:
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 0, 3)])
        await pub.send([stored(1, PROMPT, 3, 6)])
        await until(lambda: ix.match(keys()) == {"a": 6})
        assert sub.stats.gaps == 0 and sub.stats.clears == 0
    finally:
        await sub.stop()
        await pub.close()


async def test_gap_without_replay_clears_the_endpoint() -> None:
    pub, ix = FakePublisher(), PrefixIndex()
    sub = EventSubscriber("a", pub.address, ix)
    await sub.start()
    try:
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 0, 3)])
        await pub.send([stored(1, PROMPT, 3, 4)], drop=True)
        other = [9] * (2 * BS)
        await pub.send([stored(1, other, 0, 2)])
        await until(lambda: sub.stats.gaps == 1)
        assert sub.stats.clears == 1
        assert ix.match(keys()) == {}  # what was known before the gap is gone
        assert ix.match(keys(other)) == {"a": 2}  # what came after is applied
    finally:
        await sub.stop()
        await pub.close()


async def test_gap_with_replay_is_filled() -> None:
    pub, ix = FakePublisher(replay=True), PrefixIndex()
    sub = EventSubscriber("a", pub.address, ix, replay_address=pub.replay_address)
    await sub.start()
    try:
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 0, 3)])
        await pub.send([stored(1, PROMPT, 3, 4)], drop=True)
        await pub.send([stored(1, PROMPT, 4, 6)])
        await until(lambda: ix.match(keys()) == {"a": 6})
        assert sub.stats.gaps == 1 and sub.stats.clears == 0 and sub.stats.replayed >= 1
        ix.check_integrity()
    finally:
        await sub.stop()
        await pub.close()


async def test_late_coordinator_catches_up_by_replay_and_gets_later_events() -> None:
    pub, ix = FakePublisher(replay=True), PrefixIndex()
    await pub.send([stored(1, PROMPT, 0, 2)])  # before anyone subscribed
    sub = EventSubscriber("a", pub.address, ix, replay_address=pub.replay_address)
    await sub.start()
    try:
        await until(lambda: ix.match(keys()) == {"a": 2})
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 2, 6)])
        await until(lambda: ix.match(keys()) == {"a": 6})
        assert sub.stats.clears == 0
    finally:
        await sub.stop()
        await pub.close()


async def test_late_coordinator_without_replay_gets_later_events() -> None:
    pub, ix = FakePublisher(), PrefixIndex()
    await pub.send([stored(1, PROMPT, 0, 2)])  # lost: nobody subscribed yet
    sub = EventSubscriber("a", pub.address, ix)
    await sub.start()
    try:
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 2, 4)])  # parent unknown: orphaned, as documented
        other = [7] * (3 * BS)
        await pub.send([stored(1, other, 0, 3)])
        await until(lambda: ix.match(keys(other)) == {"a": 3})
        assert ix.stats.orphan_blocks == 2 and ix.match(keys()) == {}
    finally:
        await sub.stop()
        await pub.close()


async def test_reconnects_after_publisher_restart() -> None:
    pub, ix = FakePublisher(), PrefixIndex()
    sub = EventSubscriber("a", pub.address, ix, backoff_s=(0.05, 0.2))
    await sub.start()
    try:
        await prime(pub, sub)
        await pub.send([stored(1, PROMPT, 0, 6)])
        await until(lambda: ix.match(keys()) == {"a": 6})
        port = pub.port
        await pub.close()
        await until(lambda: sub.stats.disconnects == 1)
        assert ix.match(keys()) == {}  # the engine's cache died with it
        pub = FakePublisher(port=port)  # restarted engine: same port, seq from 0
        await prime(pub, sub)
        await pub.send([stored(2, PROMPT, 0, 3)])
        await until(lambda: ix.match(keys()) == {"a": 3})
        assert sub.stats.connects >= 2
    finally:
        await sub.stop()
        await pub.close()


async def test_manager_adds_and_removes_endpoints() -> None:
    p1, p2, ix = FakePublisher(), FakePublisher(), PrefixIndex()
    mgr = KVEventsManager(ix)
    s1 = await mgr.add("a", p1.address)
    s2 = await mgr.add("b", p2.address)
    try:
        await prime(p1, s1)
        await prime(p2, s2)
        await p1.send([stored(1, PROMPT, 0, 4)])
        await p2.send([stored(2, PROMPT, 0, 2)])
        await until(lambda: ix.match(keys()) == {"a": 4, "b": 2})
        await mgr.remove("b")
        assert ix.match(keys()) == {"a": 4} and ix.endpoints() == ["a"]
        assert set(mgr.subscribers) == {"a"}
    finally:
        await mgr.stop()
        await p1.close()
        await p2.close()
