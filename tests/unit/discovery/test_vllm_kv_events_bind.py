"""On Kubernetes the worker binds its KV-event socket (``--kv-events-host '*'``) and the
coordinator connects to the pod (``kv_events_bind: false``). Checked against vLLM's own
ZmqEventPublisher, in its own process, configured as the manifests configure it."""

from __future__ import annotations

import subprocess
import sys

import vllm.distributed.kv_events  # noqa: F401  (the publisher process's; fail, never skip)

from pd_runtime.kv_events import EventSubscriber, PrefixIndex
from tests.servers import until
from tests.unit.kv_events.test_vllm_publisher import PUBLISHER

from .test_kubernetes import port_in_range


async def test_vllm_binds_a_wildcard_endpoint_and_the_coordinator_connects() -> None:
    port = port_in_range()
    address = "127.0.0.1:8200"  # the pod's vLLM address, as discovery names it
    # The endpoint and topic the worker command builds for --host=POD_IP --kv-events-host='*'.
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, f"tcp://*:{port}", f"kv@{address}@tiny"],
        stdout=subprocess.PIPE,
        text=True,
    )
    index = PrefixIndex()
    sub = EventSubscriber(
        address, f"tcp://127.0.0.1:{port}", index, topic=f"kv@{address}@", bind=False
    )
    try:
        assert publisher.stdout is not None and publisher.stdout.readline().strip() == "ready"
        await sub.start()
        keys = PrefixIndex.block_keys(list(range(1, 65)), 32)
        await until(lambda: index.match(keys) == {address: 2}, timeout_s=60)
    finally:
        await sub.stop()
        publisher.kill()
        publisher.wait()
