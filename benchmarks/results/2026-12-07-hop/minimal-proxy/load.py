"""Closed loop of CONC clients sending N streamed completions (100-word prompts, 16 tokens) to
URL after 200 warm-up requests; prints req/s and the CPU per request of process PID (and its
children). Usage: load.py URL CONC N PID [LABEL]"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import psutil


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            t = q.cpu_times()
            total += t.user + t.system
    return total


def body(i: int) -> bytes:
    prompt = f"hello {i} " + "word " * 100
    request = {"model": "standin", "prompt": prompt, "max_tokens": 16, "stream": True}
    return json.dumps(request).encode()


async def main(url: str, conc: int, n: int, procs: list[psutil.Process], label: str) -> None:
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> None:
            async with session.post(url, data=body(i), headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status

        for i in range(200):
            await one(i)
        todo = iter(range(n))

        async def client() -> None:
            for i in todo:
                await one(i)

        cpu, wall = cpu_seconds(procs), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(conc)))
        wall, cpu = time.perf_counter() - wall, cpu_seconds(procs) - cpu
        print(f"{label:32s} {n / wall:6.0f} req/s, CPU {1000 * cpu / n:.3f} ms/req", flush=True)


if __name__ == "__main__":
    url, conc, n, pids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    label = sys.argv[5] if len(sys.argv) > 5 else url
    asyncio.run(main(url, conc, n, [psutil.Process(int(p)) for p in pids.split(",")], label))
