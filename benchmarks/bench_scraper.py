"""CPU the coordinator's metrics scraper spends per round, against loopback stand-ins that serve a
real vLLM ``/metrics`` text and a sidecar's ``/health`` (the deployment's shape: one prefill and
two decode endpoints, each decode endpoint behind a sidecar, so a round is 3 scrapes and 2 health
checks). The stand-ins run in another process; only the scraper's process is timed.

    python benchmarks/bench_scraper.py --metrics FILE [--rounds 400] [--baseline REF] [--out DIR]

``--baseline REF``: the same rounds with the scraper of ``pd_runtime`` as of REF (exported with
``bench_ingest.export``), in alternating child processes (the machine is shared: compare within
one run). At the default 0.5 s interval the coordinator runs two rounds a second, idle or not.
The stand-in serves the whole text only (``/metrics/`` is a 404), so since the scraper asks
vLLM's filtered ``/metrics/`` first this measures its whole-text fallback; what the filter saves
on the worker's side was measured on live vLLM workers (benchmarks/results/2026-12-07-scraper).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent


def serve(metrics: Path, ports: list[int]) -> None:
    from aiohttp import web

    text = metrics.read_text()

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics_view)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for port in ports:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def measure(ports: list[int], rounds: int) -> dict[str, float]:
    from pd_runtime.config.endpoint import EndpointConfig
    from pd_runtime.scheduling.plugins import EndpointState
    from pd_runtime.scheduling.scraper import MetricsScraper

    w0, w1, w2, s1, s2 = ports
    endpoints = [
        EndpointConfig(
            name="prefill-0",
            role="prefill",
            address=f"127.0.0.1:{w0}",
            url=f"http://127.0.0.1:{w0}",
        ),
        EndpointConfig(
            name="decode-0", role="decode", address=f"127.0.0.1:{w1}", url=f"http://127.0.0.1:{s1}"
        ),
        EndpointConfig(
            name="decode-1", role="decode", address=f"127.0.0.1:{w2}", url=f"http://127.0.0.1:{s2}"
        ),
    ]
    states = [EndpointState(e) for e in endpoints]

    async def run() -> dict[str, float]:
        scraper = MetricsScraper(states, interval_s=3600)
        await scraper.start()  # its first round runs now; the next one in an hour
        try:
            for _ in range(20):  # warm: connections open, caches filled
                await scraper.scrape_once()
            assert all(s.healthy and s.running is not None for s in states), "scrapes failed"
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                await scraper.scrape_once()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            await scraper.stop()
        return {"cpu_ms_per_round": 1000 * cpu / rounds, "wall_ms_per_round": 1000 * wall / rounds}

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--metrics", required=True, help="a vLLM /metrics text (curl WORKER/metrics)")
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3, help="child processes per version")
    ap.add_argument("--baseline", help="git ref whose scraper runs beside this tree's")
    ap.add_argument("--base-port", type=int, default=14100)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    ports = [args.base_port + i for i in range(5)]
    metrics = Path(args.metrics).resolve()
    if args.serve:
        serve(metrics, ports)
        return 0
    if args.child:
        print(json.dumps(measure(ports, args.rounds)))
        return 0
    with tempfile.TemporaryDirectory(prefix="pd-bench-baseline-") as tmp:
        trees = {"current": REPO}
        if args.baseline:
            from bench_ingest import export

            trees = {"baseline": export(args.baseline, Path(tmp)), **trees}
        results = compare(trees, metrics, args)
    summary = {
        name: {
            "cpu_ms_per_round": sorted(r["cpu_ms_per_round"] for r in rows),
            "idle_cpu_ms_per_s_at_0.5s": round(2 * median(r["cpu_ms_per_round"] for r in rows), 2),
        }
        for name, rows in results.items()
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scraper.json").write_text(
            json.dumps({"rounds": args.rounds, "runs": results, "summary": summary}, indent=1)
        )
    return 0


def compare(
    trees: dict[str, Path], metrics: Path, args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """``--repeats`` child processes per tree (``pd_runtime`` from that tree), alternating,
    against one stand-in process."""
    common = ["--metrics", str(metrics), "--base-port", str(args.base_port)]
    server = subprocess.Popen([sys.executable, __file__, "--serve", *common])
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        time.sleep(1.5)
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for name in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--rounds", str(args.rounds), *common],
                    env={**os.environ, "PYTHONPATH": str(trees[name])},
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"{name} child failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append(row)
                print(f"[scraper] {name:8s} repeat {repeat + 1}: {row['cpu_ms_per_round']:.2f} ms CPU "
                      f"per round, {row['wall_ms_per_round']:.2f} ms wall", flush=True)  # fmt: skip
    finally:
        server.terminate()
    return results


if __name__ == "__main__":
    sys.exit(main())
