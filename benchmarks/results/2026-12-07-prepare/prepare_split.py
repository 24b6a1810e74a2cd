"""Where a chat prompt's prepare time goes, per request kind of bench_scheduler's workload, and
what the hand-off to the tokenizer thread costs (the figures in this directory's README).

    PYTHONPATH=. python benchmarks/results/2026-12-07-prepare/prepare_split.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import bench_scheduler as bs  # noqa: E402

from pd_runtime.kv_events.index import PrefixIndex  # noqa: E402
from pd_runtime.model.tiny import write_model  # noqa: E402
from pd_runtime.scheduling.tokenize import PromptTokenizer  # noqa: E402


def warm_tokenizer(model: str, wl: bs.Workload) -> PromptTokenizer:
    """A tokenizer that has seen the pool (as the bench's scheduler has), not the requests."""
    tok = PromptTokenizer(model)
    tok.load()
    for p in wl.pool:
        tok.tokenize(bs.CHAT, p.body)
    return tok


async def main() -> None:
    model = str(write_model(REPO / ".cache" / "bench" / "tiny-qwen3"))
    builder = PromptTokenizer(model)
    builder.load()
    wl = bs.build_workload(builder, 400, 600, 0)
    tok = warm_tokenizer(model, wl)
    hf, seg = tok._tokenizer, tok._segments
    assert seg is not None
    split: dict[str, list[tuple[int, int, int, int]]] = {}
    for p in wl.requests:
        t0 = time.perf_counter_ns()
        text = hf.apply_chat_template(
            p.body["messages"], tokenize=False, add_generation_prompt=True
        )
        t1 = time.perf_counter_ns()
        ids = seg.encode(text)
        t2 = time.perf_counter_ns()
        assert ids is not None
        PrefixIndex.block_keys(ids, 16)
        t3 = time.perf_counter_ns()
        split.setdefault(p.kind, []).append((t1 - t0, t2 - t1, t3 - t2, len(ids)))
    print("medians per kind (µs): template, encode, block keys; tokens")
    for kind, rows in split.items():
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"  {kind:12} {len(rows):4}  {med[0] / 1e3:6.0f} {med[1] / 1e3:7.0f} "
              f"{med[2] / 1e3:5.0f}  {med[3]:5.0f}")  # fmt: skip
    tok2 = warm_tokenizer(model, wl)
    walls = []
    for p in wl.requests:
        t0 = time.perf_counter_ns()
        await tok2.atokenize(bs.CHAT, p.body)
        walls.append(time.perf_counter_ns() - t0)
    print(f"atokenize, first sight of each request: p50 {statistics.median(walls) / 1e3:.0f} µs")
    walls = []
    for p in wl.requests[:200]:  # cached now: no new text, so no thread
        t0 = time.perf_counter_ns()
        await tok2.atokenize(bs.CHAT, p.body)
        walls.append(time.perf_counter_ns() - t0)
    print(f"atokenize, cached: p50 {statistics.median(walls) / 1e3:.0f} µs")
    walls = []
    for p in wl.requests[:200]:
        t0 = time.perf_counter_ns()
        await asyncio.get_running_loop().run_in_executor(
            tok2._executor, tok2.tokenize, bs.CHAT, p.body
        )
        walls.append(time.perf_counter_ns() - t0)
    print(f"cached, whole tokenize on the thread (before this change): p50 "
          f"{statistics.median(walls) / 1e3:.0f} µs")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
