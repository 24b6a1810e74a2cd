"""The scheduler's decision with the compiled prefix index and with the Python loops, in one
process on one state, interleaved in blocks (``bench_scheduler.py``'s workload and state).

Two processes per version (``bench_scheduler.py --baseline``) cannot see a ~50 µs change on a
shared 2-core guest whose decision p50 moves by ±100 µs between runs. Here both implementations
make the same decisions (``tests/unit/kv_events/test_native.py``), so the state evolves the same
whichever runs a block: blocks of ``BLOCK`` requests alternate compiled / Python (then Python /
compiled on the second pass), each decision's thread CPU is recorded with its implementation,
and each pair of neighbouring blocks gives one paired ratio of medians.

Usage (repository root)::

    PYTHONPATH=. python benchmarks/results/2026-12-07-native/ab_native.py [ENDPOINTS ...]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_scheduler as bench

from pd_runtime.common.stats import percentile
from pd_runtime.kv_events import index as index_module
from pd_runtime.kv_events import keys as keys_module
from pd_runtime.kv_events.native import native

BLOCK = 50


def use(compiled: bool) -> None:
    index_module.native = native if compiled else None  # type: ignore[attr-defined]
    keys_module.native = native if compiled else None  # type: ignore[attr-defined]


def q(xs: list[float]) -> dict[str, float]:
    return {f"p{p}": percentile(xs, p) for p in (50, 90, 99)}


async def measure(n: int, wl: bench.Workload, model_dir: Path) -> dict[str, object]:
    rng = random.Random(n)
    sched = bench.KVAwareScheduler(
        bench.endpoints(n, bench.PREFILL), tokenizer=str(model_dir), block_size=bench.BS, seed=0
    )
    assert sched.tokenizer is not None
    await sched.tokenizer.aload()
    use(True)
    bench.fill(sched, wl, 1_000_000, rng)
    for s in sched.states.values():
        s.waiting = float(rng.choice((0, 0, 0, 1, 2, 3)))
        s.running = float(rng.randint(4, 48))
        s.kv_usage = rng.uniform(0.2, 0.85)
        s.scraped_at = time.time()
    driver = bench.Driver(sched, 4.0 * n, 2 * n)
    for i in range(int(sched.params.pending_ttl_s * 4.0 * n)):
        driver.tick()
        req = bench.request(-i, None, bench.warmup_tokens(wl, rng))
        driver.done(req, sched.schedule(req))
    gc.collect()
    cpu: dict[str, list[float]] = {"compiled": [], "python": []}
    ratios: list[float] = []
    requests = wl.requests
    for first_compiled in (True, False):  # pass 1: C, Py, C, ...; pass 2: Py, C, Py, ...
        for start in range(0, len(requests), 2 * BLOCK):
            medians = {}
            for half, compiled in enumerate((first_compiled, not first_compiled)):
                use(compiled)
                name = "compiled" if compiled else "python"
                block = []
                for i in range(
                    start + half * BLOCK, min(start + (half + 1) * BLOCK, len(requests))
                ):
                    p = requests[i]
                    req = bench.request(i, p, p.tokens)
                    driver.tick()
                    t = time.thread_time_ns()
                    res = sched.schedule(req)
                    block.append((time.thread_time_ns() - t) / 1e3)
                    driver.done(req, res)
                cpu[name] += block
                medians[name] = statistics.median(block) if block else None
            if medians.get("compiled") and medians.get("python"):
                ratios.append(medians["compiled"] / medians["python"])
        print(f"[{n}] pass {'C first' if first_compiled else 'Python first'} done", flush=True)
    use(True)
    sched.tokenizer.close()
    ratios.sort()
    return {
        "decode_endpoints": n,
        "decisions_per_implementation": len(cpu["compiled"]),
        "compiled_us": q(cpu["compiled"]),
        "python_us": q(cpu["python"]),
        "block_pairs": len(ratios),
        "ratio_p50_median": statistics.median(ratios),
        "ratio_p50_range": [ratios[0], ratios[-1]],
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoints", type=int, nargs="*", default=[8, 64, 256])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ab-native.json")
    args = ap.parse_args()
    assert native is not None, "the extension is not built"
    from pd_runtime.model.tiny import write_model

    model_dir = write_model(Path(".cache/bench/tiny-qwen3"))
    ns = argparse.Namespace(workload=None, model_dir=model_dir, pool=1600, requests=2000, seed=0)
    wl = await bench.load_workload(ns)
    rows = []
    for n in args.endpoints:
        row = await measure(n, wl, model_dir)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.write_text(json.dumps({"machine": bench.machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
