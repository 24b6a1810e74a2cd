"""Drive a workload against a server: open-loop Poisson arrivals or a closed loop.

Open loop (``rate``): conversations arrive at Poisson times (exponential gaps, mean 1/rate, from
a generator seeded with the run's seed, so the same seed gives the same schedule) whether or not
earlier ones are done; a conversation's turns follow one another. ``rate`` counts conversations
per second (= requests per second for the single-turn workloads). Closed loop (``concurrency``):
that many slots, each taking the next conversation when its previous one finishes, so at most
``concurrency`` requests are ever in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from pd_runtime.bench.client import RequestRecord, send
from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import Conversation, Workload

__all__ = ["BenchConfig", "RunResult", "build_conversations", "poisson_schedule", "run_bench"]


@dataclass
class BenchConfig:
    base_url: str
    model: str
    num_requests: int = 32
    rate: float | None = None  # conversations/s (open loop); None with concurrency = closed loop
    concurrency: int | None = None  # closed loop; with rate: a cap on open-loop in-flight too
    seed: int = 0
    timeout_s: float = 600.0
    ignore_eos: bool = True  # vLLM extension: generate exactly max_tokens
    temperature: float = 0.0
    progress: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    schedule: list[float]
    max_in_flight: int


def poisson_schedule(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (s) of ``n`` events of a Poisson process of ``rate``/s; the first at 0."""
    rng = random.Random(f"arrivals-{seed}")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def build_conversations(
    workload: Workload, text: TextGen, n_requests: int, seed: int
) -> list[Conversation]:
    return workload.build(random.Random(f"{workload.name}-{seed}"), text, n_requests)


def _body(conv: Conversation, history: list[dict[str, str]], turn: int, cfg: BenchConfig) -> dict:
    t = conv.turns[turn]
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": t.max_tokens,
        "temperature": cfg.temperature,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if conv.api == "chat":
        body["messages"] = [*history, {"role": "user", "content": t.text}]
    else:
        body["prompt"] = t.text
    return body


class _Tracker:
    def __init__(self) -> None:
        self.now = 0
        self.max = 0

    def __enter__(self) -> None:
        self.now += 1
        self.max = max(self.max, self.now)

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


async def _run_conversation(
    client: httpx.AsyncClient,
    conv: Conversation,
    cfg: BenchConfig,
    t0: float,
    records: list[RequestRecord],
    tracker: _Tracker,
    bar: Any,
) -> None:
    history: list[dict[str, str]] = []
    if conv.api == "chat" and conv.system:
        history.append({"role": "system", "content": conv.system})
    path = "/v1/chat/completions" if conv.api == "chat" else "/v1/completions"
    headers = dict(cfg.headers)
    if conv.session:
        headers["x-session-id"] = conv.session
    for i, turn in enumerate(conv.turns):
        record = RequestRecord(conv.id, i, time.perf_counter() - t0)
        with tracker:
            await send(
                client,
                cfg.base_url.rstrip("/") + path,
                _body(conv, history, i, cfg),
                record,
                headers,
            )
        records.append(record)
        if bar is not None:
            bar.update(1)
        if not record.ok:
            if bar is not None:
                bar.update(len(conv.turns) - i - 1)
            break  # the conversation cannot go on without this answer
        history += [
            {"role": "user", "content": turn.text},
            {"role": "assistant", "content": record.text},
        ]


async def run_bench(conversations: Sequence[Conversation], cfg: BenchConfig) -> RunResult:
    if cfg.rate is None and cfg.concurrency is None:
        raise ValueError("give a rate (open loop) or a concurrency (closed loop)")
    records: list[RequestRecord] = []
    tracker = _Tracker()
    total = sum(len(c.turns) for c in conversations)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="req", dynamic_ncols=True, leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    schedule: list[float] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        if cfg.rate is not None:
            schedule = poisson_schedule(len(conversations), cfg.rate, cfg.seed)
            cap = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None

            async def arrive(conv: Conversation, at: float) -> None:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                if cap is None:
                    await _run_conversation(client, conv, cfg, t0, records, tracker, bar)
                else:
                    async with cap:
                        await _run_conversation(client, conv, cfg, t0, records, tracker, bar)

            await asyncio.gather(
                *(arrive(c, at) for c, at in zip(conversations, schedule, strict=False))
            )
        else:
            queue = list(reversed(conversations))

            async def slot() -> None:
                while queue:
                    conv = queue.pop()
                    await _run_conversation(client, conv, cfg, t0, records, tracker, bar)

            await asyncio.gather(*(slot() for _ in range(cfg.concurrency or 1)))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    records.sort(key=lambda r: r.start_s)
    return RunResult(records, duration, schedule, tracker.max)
