"""Soak test: minutes of closed-loop traffic at fixed concurrency through the full P/D chain.

Starts the deployment from a config (default: the local CPU one: 1 prefill + 2 decode vLLM-CPU
workers, 2 sidecars, the coordinator with the KV-aware scheduler), keeps ``--concurrency``
requests in flight for ``--duration-s``, and records every request's outcome. Every request must
get an answer: a request is *lost* if it raised (timeout, connection error) instead of returning
an HTTP status, *failed* if its status was not 200. Every ``--sample-s`` it samples the resident
memory (RSS) of the coordinator and the sidecars, to show that their memory is stable.

Mixed traffic, seeded: shared-prefix prompts (so the scheduler's prefix routing and the direct
path are exercised), cold prompts (disaggregated), streaming and not.

Writes ``soak.json``, ``soak.md`` and ``soak.png`` (RSS over time) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd_runtime.common.sse import DONE, SSEDecoder  # noqa: E402
from pd_runtime.common.stats import percentile  # noqa: E402
from pd_runtime.config import DeploymentConfig  # noqa: E402
from pd_runtime.config.loader import load_config  # noqa: E402
from pd_runtime.demo import DEMO_PROMPT  # noqa: E402
from pd_runtime.launcher.local import LocalLauncher  # noqa: E402
from pd_runtime.launcher.prepare import prepare_deployment  # noqa: E402

WORDS = DEMO_PROMPT.split()


def make_body(rng: random.Random, model: str, i: int) -> dict[str, Any]:
    kind = rng.random()
    if kind < 0.6:  # one of 8 shared prefixes + a short question
        prefix = " ".join(WORDS[(rng.randrange(8) * 7) % len(WORDS) :] + WORDS)[:900]
        prompt = f"{prefix} Question {i}: what follows?"
    else:  # cold: a random permutation of the words
        words = WORDS[:]
        rng.shuffle(words)
        prompt = " ".join(words[:120])
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": rng.choice([8, 16, 32]),
        "temperature": 0,
        "stream": rng.random() < 0.5,
    }


async def one(client: httpx.AsyncClient, gateway: str, body: dict[str, Any]) -> tuple[str, float]:
    started = time.monotonic()
    try:
        if body["stream"]:
            async with client.stream("POST", f"{gateway}/v1/completions", json=body) as r:
                sse = SSEDecoder()
                events = [e async for piece in r.aiter_bytes() for e in sse.feed(piece)]
                ok = r.status_code == 200 and events[-1:] == [DONE]
                ok = ok and not any('"error"' in e for e in events)
                status = "ok" if ok else f"http_{r.status_code}"
        else:
            r = await client.post(f"{gateway}/v1/completions", json=body)
            status = "ok" if r.status_code == 200 else f"http_{r.status_code}"
    except httpx.HTTPError as exc:
        status = f"lost_{type(exc).__name__}"
    return status, time.monotonic() - started


async def soak(args: argparse.Namespace, gateway: str, model: str, pids: dict[str, int]) -> dict:
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    samples: list[dict[str, float]] = []
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    deadline = time.monotonic() + args.duration_s
    counter = 0
    start = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            status, seconds = await one(client, gateway, make_body(rng, model, counter))
            outcomes[status] = outcomes.get(status, 0) + 1
            latencies.append(seconds)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            row = {"t_s": round(time.monotonic() - start, 1)}
            for name, process in processes.items():
                row[name] = process.memory_info().rss / 2**20
            samples.append(row)
            done = sum(outcomes.values())
            print(f"[soak] t={row['t_s']:.0f}s done={done} outcomes={outcomes}", flush=True)
            await asyncio.sleep(args.sample_s)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(args.concurrency)))
    wall = time.monotonic() - start
    total = sum(outcomes.values())
    lost = sum(n for s, n in outcomes.items() if s.startswith("lost_"))
    failed = sum(n for s, n in outcomes.items() if s != "ok" and not s.startswith("lost_"))
    memory = {}
    for name in processes:
        series = [s[name] for s in samples]
        warm = series[len(series) // 4 :] or series  # after the first quarter (warm-up)
        memory[name] = {
            "start_mib": round(series[0], 1),
            "after_warmup_mib": round(warm[0], 1),
            "end_mib": round(series[-1], 1),
            "max_mib": round(max(series), 1),
            "growth_after_warmup_mib": round(series[-1] - warm[0], 1),
        }
    latencies.sort()
    return {
        "concurrency": args.concurrency,
        "duration_s": round(wall, 1),
        "requests": total,
        "ok": outcomes.get("ok", 0),
        "failed": failed,
        "lost": lost,
        "outcomes": outcomes,
        "throughput_rps": round(total / wall, 2),
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "memory": memory,
        "samples": samples,
    }


def write(out: Path, result: dict[str, Any], machine: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
    lines = [
        f"Soak: concurrency {result['concurrency']} for {result['duration_s']} s through the full "
        "P/D chain (coordinator kv-aware -> sidecars -> 1 prefill + 2 decode vLLM-CPU workers).",
        "",
        "| requests | ok | failed | lost | req/s | p50 s | p99 s |",
        "|---|---|---|---|---|---|---|",
        f"| {result['requests']} | {result['ok']} | {result['failed']} | {result['lost']} | "
        f"{result['throughput_rps']} | {result['latency_p50_s']} | {result['latency_p99_s']} |",
        "",
        "| process | RSS start MiB | after warm-up | end | max | growth after warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result["memory"].items():
        lines.append(
            f"| {name} | {m['start_mib']} | {m['after_warmup_mib']} | {m['end_mib']} | "
            f"{m['max_mib']} | {m['growth_after_warmup_mib']} |"
        )
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    from pd_runtime.bench.plots import bar_chart

    samples = result["samples"]
    step = max(1, len(samples) // 12)
    picked = samples[::step]
    names = list(result["memory"])
    bar_chart(
        out / "soak.png",
        f"RSS during the soak (concurrency {result['concurrency']})",
        [f"{s['t_s']:.0f}s" for s in picked],
        {name: [s[name] for s in picked] for name in names},
        ylabel="MiB",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local-cpu.yaml"))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "soak"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = load_config(DeploymentConfig, args.config)
    run_dir = Path(args.run_dir)
    plan = prepare_deployment(config, run_dir)
    launcher = LocalLauncher(plan, run_dir, startup_timeout_s=config.startup_timeout_s)
    launcher.start()
    try:
        pids = {
            p.spec.name: p.process.pid
            for p in launcher.parts
            if p.spec.kind in ("coordinator", "sidecar")
        }
        result = asyncio.run(soak(args, plan.gateway_url, plan.coordinator.models[0], pids))
    finally:
        launcher.stop()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write(Path(args.out), result, machine)
    print(Path(args.out, "soak.md").read_text())
    return 0 if result["lost"] == 0 and result["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
