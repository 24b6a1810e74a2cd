"""Our subscriber against vLLM's own ZmqEventPublisher, configured as pd-runtime configures it.

vLLM binds its PUB socket only for wildcard endpoints and *connects* to any other; the worker
command gives it ``tcp://HOST:PORT``, so the subscriber must bind. (A stand-in publisher that
binds hid this: against real workers the index stayed empty.) The publisher runs in its own
process, started before the subscriber binds, as a worker that starts before the coordinator.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import vllm.distributed.kv_events  # noqa: F401  (the publisher process's; fail, never skip)

from pd_runtime.kv_events import EventSubscriber, PrefixIndex
from tests.servers import free_port, until

#: vLLM's own publisher in its own process: ``python -c PUBLISHER ENDPOINT TOPIC``.
PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher
    endpoint, topic = sys.argv[1], sys.argv[2]
    pub = ZmqEventPublisher(0, endpoint=endpoint, topic=topic)
    tokens = list(range(1, 65))
    print("ready", flush=True)
    for _ in range(600):  # PUB drops what it sends before the subscriber is connected: repeat
        pub.publish(KVEventBatch(ts=time.time(), events=[BlockStored(
            block_hashes=[11, 12], parent_block_hash=None, token_ids=tokens, block_size=32,
            lora_id=None, medium="GPU", lora_name=None)]))
        time.sleep(0.05)
    pub.shutdown()
    """
)


async def test_vllm_publisher_connects_to_a_bound_subscriber() -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    endpoint = f"127.0.0.1:{port + 1}"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, f"tcp://127.0.0.1:{port}", f"kv@{endpoint}@tiny"],
        stdout=subprocess.PIPE,
        text=True,
    )
    index = PrefixIndex()
    sub = EventSubscriber(endpoint, address, index, topic=f"kv@{endpoint}@", bind=True)
    try:
        assert publisher.stdout is not None and publisher.stdout.readline().strip() == "ready"
        await sub.start()
        keys = PrefixIndex.block_keys(list(range(1, 65)), 32)
        await until(lambda: index.match(keys) == {endpoint: 2}, timeout_s=60)
        assert sub.stats.connects >= 1
    finally:
        await sub.stop()
        publisher.kill()
        publisher.wait()


async def test_a_publisher_with_another_topic_is_ignored() -> None:
    port = free_port()
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, f"tcp://127.0.0.1:{port}", "kv@10.0.0.9:8200@tiny"],
        stdout=subprocess.PIPE,
        text=True,
    )
    index = PrefixIndex()
    endpoint = "127.0.0.1:8200"
    sub = EventSubscriber(
        endpoint, f"tcp://127.0.0.1:{port}", index, topic=f"kv@{endpoint}@", bind=True
    )
    try:
        assert publisher.stdout is not None and publisher.stdout.readline().strip() == "ready"
        await sub.start()
        await until(lambda: sub.stats.connects >= 1, timeout_s=60)
        await asyncio.sleep(1.0)
        assert index.size() == 0 and sub.stats.batches == 0
    finally:
        await sub.stop()
        publisher.kill()
        publisher.wait()


LATE = textwrap.dedent(
    """
    import sys, time
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher
    port, replay, topic = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    pub = ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}",
                            replay_endpoint=f"tcp://127.0.0.1:{replay}", topic=topic)
    tokens = list(range(1, 97))
    # Three blocks stored in two steps while nobody listens: PUB drops them, the buffer keeps them.
    pub.publish(KVEventBatch(ts=time.time(), events=[BlockStored(
        block_hashes=[21, 22], parent_block_hash=None, token_ids=tokens[:64], block_size=32,
        lora_id=None, medium="GPU", lora_name=None)]))
    pub.publish(KVEventBatch(ts=time.time(), events=[BlockStored(
        block_hashes=[23], parent_block_hash=22, token_ids=tokens[64:], block_size=32,
        lora_id=None, medium="GPU", lora_name=None)]))
    time.sleep(0.5)
    print("ready", flush=True)
    time.sleep(60)
    pub.shutdown()
    """
)


async def test_a_subscriber_that_starts_late_catches_up_from_vllms_replay_socket() -> None:
    port, replay = free_port(), free_port()
    endpoint = f"127.0.0.1:{port + 1}"
    publisher = subprocess.Popen(
        [sys.executable, "-c", LATE, str(port), str(replay), f"kv@{endpoint}@tiny"],
        stdout=subprocess.PIPE,
        text=True,
    )
    index = PrefixIndex()
    sub = EventSubscriber(
        endpoint,
        f"tcp://127.0.0.1:{port}",
        index,
        topic=f"kv@{endpoint}@",
        replay_address=f"tcp://127.0.0.1:{replay}",
        bind=True,
    )
    try:
        assert publisher.stdout is not None and publisher.stdout.readline().strip() == "ready"
        await sub.start()  # the worker was up first: its events were published to nobody
        keys = PrefixIndex.block_keys(list(range(1, 97)), 32)
        await until(lambda: index.match(keys) == {endpoint: 3}, timeout_s=60)
        assert sub.stats.replayed == 2
    finally:
        await sub.stop()
        publisher.kill()
        publisher.wait()
