"""KV-event ingestion (msgpack decode + PrefixIndex apply), two versions of pd_runtime side by side.

The benchmark machine is shared and noisy, so a before/after comparison taken from two runs an hour
apart measures the neighbours as much as the change. This runs both versions in the same session:
``--baseline REF`` exports ``pd_runtime`` at a git ref into a temporary directory, then each round
starts one worker process per version (baseline, working tree; order alternating per round), each
importing its own ``pd_runtime`` through ``PYTHONPATH`` and measuring the workload of
``bench_prefix_index.py`` (same generator, same seeds):

* decode, apply, decode+apply: CPU time of decoding every payload, then of applying every batch
  (the numbers ``bench_prefix_index.py`` reports; all decoded events are alive at once);
* pipelined: decode one payload, apply it, drop it, as the subscriber does (CPU time);
* tracemalloc bytes per indexed (endpoint, block) entry on a smaller index.

The median over rounds is reported, with the range of decode+apply. Usage:

    python benchmarks/bench_ingest.py [--baseline HEAD] [--rounds 3] [--blocks 1000000] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS = (
    "decode_blocks_per_s",
    "apply_blocks_per_s",
    "ingest_blocks_per_s",
    "pipelined_blocks_per_s",
)


def worker(endpoints: list[int], blocks: int, memory_blocks: int) -> dict[str, Any]:
    """Runs in a child process whose ``pd_runtime`` is the version under test."""
    import bench_prefix_index as bench

    import pd_runtime
    from pd_runtime.kv_events import PrefixIndex, decode_batch

    rows = []
    for e in endpoints:
        data, _ = bench.payloads(e, blocks, seed=e)
        gc.collect()
        # As the subscriber does it: decode a batch, apply it, let it go.
        ix = PrefixIndex()
        t0 = time.process_time()
        for ep, ps in data.items():
            for p in ps:
                ix.apply_batch(ep, decode_batch(p).events)
        t_pipelined = time.process_time() - t0
        del ix
        gc.collect()
        t0 = time.process_time()
        decoded = [(ep, [decode_batch(p) for p in ps]) for ep, ps in data.items()]
        t_decode = time.process_time() - t0
        del data
        ix = PrefixIndex()
        gc.disable()  # as in bench_prefix_index: events are gc=False structs, no cycles
        t0 = time.process_time()
        for ep, batches in decoded:
            for batch in batches:
                ix.apply_batch(ep, batch.events)
        t_apply = time.process_time() - t0
        gc.enable()
        entries = sum(sum(c.values()) for c in ix.endpoint_counts().values())
        rows.append(
            {
                "endpoints": e,
                "indexed_entries": entries,
                "decode_blocks_per_s": entries / t_decode,
                "apply_blocks_per_s": entries / t_apply,
                "ingest_blocks_per_s": entries / (t_decode + t_apply),
                "pipelined_blocks_per_s": entries / t_pipelined,
            }
        )
        del decoded, ix
    memory = bench.memory(memory_blocks)
    return {"pd_runtime": str(Path(pd_runtime.__file__).parent), "runs": rows, "memory": memory}


def export(ref: str, into: Path) -> Path:
    """``pd_runtime`` as of ``ref``, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "pd_runtime"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    # REPO last: the worker imports benchmarks.machine; pd_runtime still comes from ``path``.
    pythonpath = os.pathsep.join(map(str, (path, REPO / "benchmarks", REPO)))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--blocks", str(args.blocks)]
    cmd += ["--memory-blocks", str(args.memory_blocks), "--endpoints"]
    cmd += [str(e) for e in args.endpoints]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd="/").stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if Path(result["pd_runtime"]) != path / "pd_runtime":  # e.g. an editable install won
        raise RuntimeError(f"child imported {result['pd_runtime']}, wanted {path}/pd_runtime")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="HEAD", help="git ref of the 'before' version")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--memory-blocks", type=int, default=131_072)
    ap.add_argument("--endpoints", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.endpoints, args.blocks, args.memory_blocks)))
        return
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pd-bench-baseline-") as tmp:
        versions = {"baseline": export(args.baseline, Path(tmp)), "current": REPO}
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(reversed(versions))
            for v in order:
                t = time.perf_counter()
                results[v].append(run_child(versions[v], args))
                ingest = [f"{x['ingest_blocks_per_s']:,.0f}" for x in results[v][-1]["runs"]]
                print(f"round {r + 1}/{args.rounds} {v:8s} ingest/s {ingest} "
                      f"({time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
    summary = []
    for i, e in enumerate(args.endpoints):
        for v in versions:
            rows = [res["runs"][i] for res in results[v]]
            summary.append(
                {
                    "endpoints": e,
                    "version": v,
                    "indexed_entries": rows[0]["indexed_entries"],
                    **{m: statistics.median(row[m] for row in rows) for m in METRICS},
                    "ingest_min": min(row["ingest_blocks_per_s"] for row in rows),
                    "ingest_max": max(row["ingest_blocks_per_s"] for row in rows),
                }
            )
    memory = {v: results[v][0]["memory"] for v in versions}
    md = table(summary, memory)
    print("\n" + md)
    print(f"total {time.perf_counter() - wall:.0f}s wall")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine(),
            "args": vars(args) | {"out": str(args.out)},
            "baseline_commit": subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", args.baseline],
                capture_output=True,
                text=True,
            ).stdout.strip(),
            "summary": summary,
            "memory": memory,
            "rounds": results,
        }
        (args.out / "ingest.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "ingest.md").write_text(md)
        plot(summary, args.out / "ingest.png")


def table(summary: list[dict[str, Any]], memory: dict[str, dict[str, float]]) -> str:
    lines = [
        "| endpoints | version | entries | decode/s | apply/s | decode+apply/s (min-max) "
        "| pipelined/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['endpoints']} | {s['version']} | {s['indexed_entries']:,} "
            f"| {s['decode_blocks_per_s']:,.0f} | {s['apply_blocks_per_s']:,.0f} "
            f"| {s['ingest_blocks_per_s']:,.0f} ({s['ingest_min']:,.0f}-{s['ingest_max']:,.0f}) "
            f"| {s['pipelined_blocks_per_s']:,.0f} |"
        )
    lines.append("")
    for v, m in memory.items():
        lines.append(f"memory {v}: {m['bytes_per_entry']:.1f} B/entry ({m['entries']:,} entries)")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    from pd_runtime.bench.plots import bar_chart

    groups = sorted({s["endpoints"] for s in summary})
    series = {}
    for v in ("baseline", "current"):
        for metric, label in (("ingest", "decode+apply"), ("pipelined", "pipelined")):
            series[f"{v}: {label}"] = [
                next(
                    s[f"{metric}_blocks_per_s"]
                    for s in summary
                    if s["endpoints"] == e and s["version"] == v
                )
                for e in groups
            ]
    bar_chart(
        path,
        "KV-event ingestion, ~1 M (endpoint, block) entries (median of rounds, CPU time)",
        [f"{e} endpoints" for e in groups],
        series,
        ylabel="blocks/s",
        targets={"target 200k blocks/s": 200_000},
    )


def machine() -> dict[str, Any]:
    from pd_runtime.bench.machine import describe_machine

    return describe_machine(extra_versions=("msgspec", "pyzmq"))


if __name__ == "__main__":
    main()
