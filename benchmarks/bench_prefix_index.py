"""PrefixIndex throughput, match latency and memory on synthetic vLLM-shaped events.

Workload: a pool of prompt chains (64 blocks of 16 tokens = 1,024 tokens; the first block unique,
so every chain has its own keys); each endpoint stores a random subset of the pool, so popular
prefixes sit on several endpoints and ``match`` has several candidates alive. Events look like
vLLM's: one BlockStored per 16 blocks, 4 events per batch, sha256 engine hashes, encoded with
msgspec msgpack exactly as ZmqEventPublisher does.

Measured per endpoint count: decode (payload -> batch), apply (batch -> index), ``match`` p50/p99
over random pool prompts (keys computed beforehand; ``block_keys`` timed separately), and
tracemalloc bytes per indexed (endpoint, block) entry on a smaller run. Times are CPU time of this
process/thread (``process_time``, ``thread_time_ns``), not wall time: the benchmark machine is shared,
and wall-clock percentiles there measure the other tenants' time slices. Usage:

    python benchmarks/bench_prefix_index.py [--blocks 1000000] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
import tracemalloc
from pathlib import Path

import msgspec

from pd_runtime.kv_events import BlockStored, KVEventBatch, PrefixIndex, decode_batch

BS, CHAIN, PER_EVENT, PER_BATCH, REPLICATION = 16, 64, 16, 4, 4
BODY = [random.Random(0).randrange(32000) for _ in range(CHAIN * BS)]


def chain_tokens(c: int) -> list[int]:
    return [c % 32000, c // 32000] + [7] * (BS - 2) + BODY[BS:]


def payloads(endpoints: int, blocks: int, seed: int) -> tuple[dict[str, list[bytes]], int]:
    """Encoded batches per endpoint; about ``blocks`` stored (endpoint, block) entries in all."""
    rng = random.Random(seed)
    pool = max(1, blocks // CHAIN // REPLICATION)
    per_ep = max(1, blocks // CHAIN // endpoints)
    enc = msgspec.msgpack.Encoder()
    out: dict[str, list[bytes]] = {}
    for e in range(endpoints):
        events = []
        for c in rng.sample(range(pool), min(per_ep, pool)):
            toks = chain_tokens(c)
            # 32-byte engine hashes like sha256's, made cheaply (unique per endpoint/chain/block)
            hashes = [(e << 48 | c << 8 | i).to_bytes(32, "big") for i in range(CHAIN)]
            for s in range(0, CHAIN, PER_EVENT):
                events.append(
                    BlockStored(
                        block_hashes=hashes[s : s + PER_EVENT],  # type: ignore[arg-type]
                        parent_block_hash=hashes[s - 1] if s else None,
                        token_ids=toks[s * BS : (s + PER_EVENT) * BS],
                        block_size=BS,
                        medium="GPU",
                    )
                )
        out[f"10.0.{e // 256}.{e % 256}:8000"] = [
            enc.encode(KVEventBatch(ts=0.0, events=events[i : i + PER_BATCH]))
            for i in range(0, len(events), PER_BATCH)
        ]
    return out, pool


def run(endpoints: int, blocks: int, queries: int) -> dict[str, float]:
    data, pool = payloads(endpoints, blocks, seed=endpoints)
    gc.collect()
    t0 = time.process_time()
    decoded = {ep: [decode_batch(p) for p in ps] for ep, ps in data.items()}
    t_decode = time.process_time() - t0
    del data
    ix = PrefixIndex()
    gc.disable()  # events are gc=False structs; the index holds no cycles
    t0 = time.process_time()
    for ep, batches in decoded.items():
        for batch in batches:
            ix.apply_batch(ep, batch.events)
    t_apply = time.process_time() - t0
    gc.enable()
    entries = sum(sum(c.values()) for c in ix.endpoint_counts().values())
    rng = random.Random(1)
    prompts = [chain_tokens(rng.randrange(pool)) for _ in range(queries)]
    t0 = time.process_time()
    qkeys = [ix.block_keys(p, BS) for p in prompts]
    t_keys = (time.process_time() - t0) / queries
    lat, hits = [], []
    for k in qkeys:
        t = time.thread_time_ns()
        m = ix.match(k)
        lat.append(time.thread_time_ns() - t)
        hits.append(len(m))
    # Imported here: bench_ingest's children import this module beside an older pd_runtime.
    from pd_runtime.common.stats import percentile

    return {
        "endpoints": endpoints,
        "indexed_entries": entries,
        "distinct_keys": ix.size(),
        "decode_blocks_per_s": entries / t_decode,
        "apply_blocks_per_s": entries / t_apply,
        "ingest_blocks_per_s": entries / (t_decode + t_apply),
        "match_p50_us": percentile(lat, 50) / 1e3,
        "match_p99_us": percentile(lat, 99) / 1e3,
        "mean_endpoints_matched": statistics.fmean(hits),
        "block_keys_1024_tokens_us": t_keys * 1e6,
    }


def memory(blocks: int) -> dict[str, float]:
    data, _ = payloads(64, blocks, seed=99)
    decoded = {ep: [decode_batch(p) for p in ps] for ep, ps in data.items()}
    del data
    gc.collect()
    tracemalloc.start()
    ix = PrefixIndex()
    for ep, batches in decoded.items():
        for batch in batches:
            ix.apply_batch(ep, batch.events)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = sum(sum(c.values()) for c in ix.endpoint_counts().values())
    return {
        "entries": entries,
        "distinct_keys": ix.size(),
        "bytes_per_entry": used / entries,
        "bytes_per_distinct_key": used / ix.size(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--endpoints", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    start, wall = time.process_time(), time.perf_counter()
    rows = [run(e, args.blocks, args.queries) for e in args.endpoints]
    mem = memory(min(args.blocks, 131_072))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[c]:,.1f}" if isinstance(r[c], float) else f"{r[c]:,}" for c in cols)
            + " |"
        )
    print(f"\nmemory (64 endpoints, tracemalloc): {mem}")
    print(f"total {time.perf_counter() - wall:.1f}s wall, {time.process_time() - start:.1f}s CPU")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
        }
        (args.out / "results.json").write_text(
            json.dumps(
                {
                    "machine": machine,
                    "args": vars(args) | {"out": str(args.out)},
                    "runs": rows,
                    "memory": mem,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
