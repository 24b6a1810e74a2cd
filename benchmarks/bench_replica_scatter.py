"""How many homes a burst of one new prefix gets when coordinator replicas split it.

Each replica is its own KVAwareScheduler (as in ``coordinator.replicas``: no shared state). A
burst of ``--burst`` requests with one new prompt arrives faster than the engines' KV events
(nothing is indexed yet), round-robin across the replicas; every request stays in flight. A
replica's pending overlay holds only its own claims, so with the default profiles each replica
can give the prefix a home of its own; the replicated profiles (ties by the prompt's first block,
no per-replica cold-spreader) should give it one. Reported per setting: mean and max distinct
decode endpoints per prefix over ``--prefixes`` prefixes, and how evenly the prefixes' first
homes spread over the endpoints. No engine, no network: the scheduler objects only.

    python benchmarks/bench_replica_scatter.py --out benchmarks/results/<date>-replicas/scatter.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from pd_runtime.config.coordinator import EndpointConfig
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler

BLOCK = 16


def endpoints(decode: int) -> list[EndpointConfig]:
    return [
        EndpointConfig(
            name=f"decode-{i}",
            role="decode",
            address=f"10.0.0.{i + 1}:8200",
            url=f"http://10.0.0.{i + 1}:8300",
        )
        for i in range(decode)
    ]


def homes_per_prefix(
    replicas: int, profiles_for: int, decode: int, burst: int, prefixes: int, seed: int
) -> dict[str, Any]:
    """``profiles_for``: the ``replicas`` parameter the schedulers get (1: default profiles)."""
    homes: list[int] = []
    first_homes: Counter[str] = Counter()
    for p in range(prefixes):
        group = [
            KVAwareScheduler(
                endpoints(decode),
                tokenizer=None,
                block_size=BLOCK,
                pd_threshold_tokens=10**6,
                seed=seed + 1000 * p + r,
                replicas=profiles_for,
            )
            for r in range(replicas)
        ]
        tokens = [p * 10_000 + t for t in range(8 * BLOCK)]
        keys = PrefixIndex.block_keys(tokens, BLOCK)
        chosen: list[str] = []
        for i in range(burst):
            request = SchedulingRequest(
                f"{p}-{i}",
                "m",
                "/v1/completions",
                {"prompt": "x", "max_tokens": 16},
                token_ids=tokens,
                block_keys=keys,
            )
            chosen.append(group[i % replicas].schedule(request).decode.name)
        homes.append(len(set(chosen)))
        first_homes[chosen[0]] += 1
    return {
        "replicas": replicas,
        "profiles": "default" if profiles_for == 1 else "replicated",
        "homes_mean": round(statistics.mean(homes), 3),
        "homes_max": max(homes),
        "first_home_spread": sorted(first_homes.values(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", type=int, default=8, help="decode endpoints")
    parser.add_argument(
        "--burst", type=int, default=6, help="requests per new prefix (under the saturation limit)"
    )
    parser.add_argument("--prefixes", type=int, default=200, help="new prefixes tried")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for replicas in (1, 2, 4):
        for profiles_for in sorted({1, replicas}):
            rows.append(
                homes_per_prefix(
                    replicas, profiles_for, args.decode, args.burst, args.prefixes, args.seed
                )
            )
            print(json.dumps(rows[-1]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
