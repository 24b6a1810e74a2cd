"""``pd-runtime bench``: one workload against an OpenAI-compatible server, or the scenario run.

    pd-runtime bench --base-url http://127.0.0.1:8000 --model tiny-qwen3 \
        --workload shared-prefix --param groups=4 --num-requests 32 --rate 2 \
        --slo ttft_ms=500 --slo tpot_ms=50 --tokenizer .cache/models/tiny-qwen3 --out results/x
    pd-runtime bench scenarios [--config pd_runtime/bench/configs/local-cpu.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pd_runtime.bench.metrics import parse_slos, summarize
from pd_runtime.bench.report import markdown_table, run_json, write_json
from pd_runtime.bench.runner import BenchConfig, build_conversations, run_bench
from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import WORKLOADS, make_workload

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd-runtime bench",
        description="Benchmark an OpenAI-compatible server (streaming completions/chat). "
        "'pd-runtime bench scenarios --config FILE' runs the scenario comparison instead.",
    )
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--workload", choices=WORKLOADS.names(), default="random")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload parameter, e.g. input_len=256 (repeat)",
    )
    p.add_argument("--num-requests", type=int, default=32)
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    loop.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="KEY=MS",
        help="goodput SLO: ttft_ms, tpot_ms, itl_ms or e2e_ms (repeat)",
    )
    p.add_argument("--tokenizer", help="tokenizer dir/file for exact prompt lengths")
    p.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", help="write the run JSON (config, summary, per-request records) here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _kv(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"pd-runtime bench: {what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "scenarios":
        from pd_runtime.bench.scenarios import main as scenarios_main

        return scenarios_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.rate is None and args.concurrency is None:
        args.concurrency = 1
    try:
        slos = parse_slos(args.slo)
        workload = make_workload(args.workload, _kv(args.param, "--param"))
    except (ValueError, KeyError) as exc:
        print(f"pd-runtime bench: {exc}", file=sys.stderr)
        return 2
    cfg = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        num_requests=args.num_requests,
        rate=args.rate,
        concurrency=args.concurrency if args.rate is None else args.max_concurrency,
        seed=args.seed,
        timeout_s=args.timeout,
        ignore_eos=not args.no_ignore_eos,
        progress=not args.no_progress,
        headers=_kv(args.header, "--header"),
    )
    conversations = build_conversations(
        workload, TextGen(args.tokenizer), args.num_requests, args.seed
    )
    result = asyncio.run(run_bench(conversations, cfg))
    summary = summarize(result.records, result.duration_s, slos)
    row = {"scenario": args.base_url, "workload": args.workload, **summary}
    print(markdown_table([row]), end="")
    errors = [r.error for r in result.records if r.error]
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    if args.out:
        config = {
            **{k: v for k, v in vars(cfg).items() if k != "headers"},
            "workload": args.workload,
            "workload_params": workload.params(),
        }
        write_json(Path(args.out), run_json(result, summary, config))
        print(f"wrote {args.out}")
    else:
        print(json.dumps(summary, indent=1))
    return 0
