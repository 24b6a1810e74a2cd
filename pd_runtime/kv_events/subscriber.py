"""Feeding the PrefixIndex from each engine's ZMQ PUB socket, on the coordinator's event loop.

One :class:`EventSubscriber` per engine: a SUB socket on ``tcp://HOST:PORT``, a monitor socket for
connect/disconnect, and optionally the engine's replay ROUTER (vLLM's ``replay_endpoint``).

Who binds: vLLM's publisher *binds* only wildcard endpoints (``tcp://*:PORT``, all interfaces) and
*connects* to any other. pd-runtime gives each worker ``tcp://HOST:PORT`` and the subscriber binds
it (``bind=True``): nothing listens on a public interface, the worker may start before or after the
coordinator (ZMQ retries the connection), and the topic prefix (``kv@HOST:PORT@``) keeps out any
other publisher that connects to the port. ``bind=False`` connects to a publisher that binds.

Sequence numbers decide what can be trusted::

    seq == expected           apply
    seq >  expected  (gap)    replay [expected, seq) from the ROUTER, else clear the endpoint
    seq <  expected           a duplicate of a replayed batch (drop), else the publisher restarted:
                              clear the endpoint, then apply
    decode error              skip; the next batch then looks like a gap
    disconnected              clear the endpoint: if the engine died its cache died with it
    connected                 with a ROUTER: catch up from seq 0 (vLLM keeps ``buffer_steps``
                              batches), so a coordinator that starts late still learns old blocks

Replay protocol (vLLM ``ZmqEventPublisher._service_replay``): a DEALER sends ``[b"", start]``
(8-byte big-endian); the ROUTER answers ``[b"", topic, seq, payload]`` for each buffered
``seq >= start`` and ends with ``[b"", b"", (-1).to_bytes(8, signed), b""]``. Clearing loses hits
until blocks are stored again but never routes to a cache that is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pd_runtime.kv_events.events import EventDecodeError, KVEventMessage, decode_message
from pd_runtime.kv_events.index import PrefixIndex

__all__ = ["EventSubscriber", "SubscriberStats"]

log = logging.getLogger(__name__)

#: How long ``stop`` waits for the subscriber task to unwind after cancelling it.
STOP_TIMEOUT_S = 5.0

_END_SEQ = (-1).to_bytes(8, "big", signed=True)
_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


@dataclass(slots=True)
class SubscriberStats:
    """Counters since start; ``batches``/``events`` count applied ones (replayed included)."""

    batches: int = 0
    events: int = 0
    replayed: int = 0
    duplicates: int = 0
    gaps: int = 0
    clears: int = 0
    decode_errors: int = 0
    connects: int = 0
    disconnects: int = 0
    errors: int = 0
    last_seq: int | None = None


class EventSubscriber:
    """Subscribe to one engine's KV events and apply them to ``index`` under ``endpoint``."""

    def __init__(
        self,
        endpoint: str,
        address: str,
        index: PrefixIndex,
        *,
        topic: str = "",
        replay_address: str | None = None,
        bind: bool = False,
        replay_timeout_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint, self.address, self.index = endpoint, address, index
        self.topic, self.replay_address, self.bind = topic, replay_address, bind
        self.replay_timeout_s = replay_timeout_s
        self.backoff_s = backoff_s
        self.stats = SubscriberStats()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._next_seq: int | None = None
        self._dup_floor: int | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (idempotent); returns at once, connecting is asynchronous."""
        self.index.add_endpoint(self.endpoint)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kv-events:{self.endpoint}")

    async def stop(self) -> None:
        """Stop the task and close its sockets; the endpoint's blocks stay in the index."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a stop must never hang a coordinator's shutdown or an endpoint's removal.
            done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            if not done:
                log.warning(
                    "kv events from %s: task did not stop in %.0fs", self.address, STOP_TIMEOUT_S
                )
            elif not task.cancelled() and task.exception() is not None:
                log.warning("kv events from %s: task ended with %r", self.address, task.exception())

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken socket or a bug: start over, never die silently
                self.stats.errors += 1
                log.exception("kv events from %s failed; retry in %.1fs", self.address, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])
            else:  # pragma: no cover - _session only returns by raising
                delay = self.backoff_s[0]

    async def _session(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.RECONNECT_IVL, int(self.backoff_s[0] * 1000))
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff_s[1] * 1000))
        monitor = sub.get_monitor_socket(_MONITORED)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            if self.bind:
                sub.bind(self.address)
            else:
                sub.connect(self.address)
            poller = zmq.asyncio.Poller()
            poller.register(sub, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    await self._on_monitor(int(event["event"]))
                if sub in ready:
                    frames = await sub.recv_multipart()
                    try:
                        msg = decode_message(frames)
                    except EventDecodeError:
                        self.stats.decode_errors += 1
                        log.warning("undecodable KV event message from %s", self.address)
                        continue
                    await self._on_message(msg)
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    # ---- sequence handling ------------------------------------------------------------------

    async def _on_monitor(self, kind: int) -> None:
        if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
            self.stats.connects += 1
            if self.replay_address is not None:
                await self._catch_up()
        elif kind == zmq.EVENT_DISCONNECTED:
            self.stats.disconnects += 1
            self._clear("publisher disconnected")
            self._next_seq = None

    async def _on_message(self, msg: KVEventMessage) -> None:
        seq, expected = msg.seq, self._next_seq
        if expected is not None and seq < expected:
            if self._dup_floor is not None and seq >= self._dup_floor:
                self.stats.duplicates += 1
                return
            self._clear(f"sequence went back from {expected} to {seq}: publisher restarted")
        elif expected is not None and seq > expected:
            self.stats.gaps += 1
            if not await self._replay(expected, seq):
                self._clear(f"missed batches {expected}..{seq - 1}")
        self._dup_floor = None
        self._apply(msg)

    def _apply(self, msg: KVEventMessage) -> None:
        self.index.apply_batch(self.endpoint, msg.batch.events)
        self.stats.batches += 1
        self.stats.events += len(msg.batch.events)
        self.stats.last_seq = msg.seq
        self._next_seq = msg.seq + 1

    def _clear(self, reason: str) -> None:
        self.stats.clears += 1
        self.index.clear(self.endpoint)
        log.warning("kv events from %s: %s; cleared %s", self.address, reason, self.endpoint)

    async def _catch_up(self) -> None:
        """Replay the publisher's whole buffer into a cleared endpoint (start or reconnect)."""
        self.index.clear(self.endpoint)
        self._next_seq = None
        if await self._replay(0, None):
            self._dup_floor = 0

    async def _replay(self, start: int, stop: int | None) -> bool:
        """Apply buffered batches ``[start, stop)``; True if every one arrived, in order.

        With ``stop=None`` (catch-up) the buffer may begin after ``start`` (old batches were
        dropped); what it holds is applied, and unresolvable blocks are counted as orphans.
        """
        if self.replay_address is None:
            return False
        dealer = self._ctx.socket(zmq.DEALER)
        try:
            dealer.connect(self.replay_address)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout_s)
                if len(frames) == 4 and frames[2] == _END_SEQ:
                    return stop is None or self._next_seq == stop
                msg = decode_message(frames[1:])
                if stop is not None and msg.seq >= stop:
                    continue
                if self._next_seq is not None and msg.seq != self._next_seq:
                    return False
                self._apply(msg)
                self.stats.replayed += 1
        except (TimeoutError, EventDecodeError, zmq.ZMQError) as exc:
            log.warning("replay from %s failed: %r", self.replay_address, exc)
            return False
        finally:
            dealer.close(linger=0)
