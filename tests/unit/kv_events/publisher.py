"""FakePublisher: an in-process stand-in for vLLM's ZmqEventPublisher (named a fake on purpose).

It speaks the same protocol on real loopback sockets: PUB ``[topic, seq, payload]`` and an optional
ROUTER answering replay requests from a buffer, so tests can skip sequence numbers (``drop``) and
restart on the same port, which a real engine cannot be made to do on demand.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import zmq
import zmq.asyncio

from pd_runtime.kv_events import KVEventBatch

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _bind(sock: zmq.Socket, port: int = 0) -> int:
    sock.bind(f"tcp://127.0.0.1:{port}")
    return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])


class FakePublisher:
    def __init__(self, *, port: int = 0, replay: bool = False, topic: str = "kv@test") -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.pub = self.ctx.socket(zmq.PUB)
        self.port = _bind(self.pub, port)
        self.router = self.ctx.socket(zmq.ROUTER) if replay else None
        self.replay_port = _bind(self.router) if self.router is not None else None
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self._server = asyncio.create_task(self._serve()) if self.router is not None else None

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_address(self) -> str | None:
        return None if self.replay_port is None else f"tcp://127.0.0.1:{self.replay_port}"

    async def send(self, events: list, *, drop: bool = False) -> int:
        """Publish one batch (or only buffer it, ``drop=True``, making a gap); returns its seq."""
        seq, self.seq = self.seq, self.seq + 1
        payload = msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=events))
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def _serve(self) -> None:
        assert self.router is not None
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    )
            await self.router.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._server is not None:
            self._server.cancel()
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)
