"""Component benchmarks (benchmarks/bench_proxy.py, bench_nixl.py): the arithmetic they report,
the stand-in server timing the proxy benchmark assumes, and that a NIXL transfer between two
processes moves the right bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import numpy as np
import pytest
from bench_nixl import fill_pattern, nixl_pair, slots_for  # benchmarks/ (see conftest.py)
from bench_proxy import Sample, added_latency, one_request, paired_ratios, ratios_table, summarize
from standin_openai import StandIn, start

from pd_runtime.common.stats import percentile

__all__: list[str] = []


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- arithmetic ---------------------------------------------------------------------------------


def test_summary_skips_failures_and_overhead_is_path_minus_direct() -> None:
    direct = [Sample(True, 0.001 * i, 0.002 * i, 16) for i in range(1, 101)]
    slower = [Sample(True, s.ttft_s + 0.004, s.e2e_s + 0.005, 16) for s in direct]  # type: ignore[operator]
    slower.append(Sample(False, None, 9.0, 0))  # an error must not enter the percentiles
    d, p = summarize(direct, wall_s=2.0), summarize(slower, wall_s=4.0)
    assert d["requests"] == 100 and d["errors"] == 0 and d["throughput_rps"] == 50.0
    assert p["requests"] == 101 and p["errors"] == 1
    assert d["ttft_p50_ms"] == pytest.approx(50.5)
    assert d["e2e_p99_ms"] == pytest.approx(198.02)
    assert p["e2e_p99_ms"] == pytest.approx(203.02)  # not 9000: the failed sample is out
    added = added_latency(p, d)
    assert added["added_ttft_p50_ms"] == pytest.approx(4.0)
    assert added["added_ttft_p99_ms"] == pytest.approx(4.0)
    assert added["added_e2e_p50_ms"] == pytest.approx(5.0)
    assert added["ratio_e2e_p50"] == pytest.approx(106.0 / 101.0, abs=0.01)


# ---- the stand-in server ------------------------------------------------------------------------


async def _measure(standin: StandIn, bodies: list[dict[str, object]]) -> list[Sample]:
    ports = [_port(), _port()]
    runner = await start(standin, "127.0.0.1", ports)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{ports[0]}/v1/completions"
            headers = {"content-type": "application/json"}
            out = [await one_request(session, url, json.dumps(b).encode(), headers) for b in bodies]
            # not streamed: one JSON answer with kv_transfer_params, counted on its own port
            async with session.post(
                f"http://127.0.0.1:{ports[1]}/v1/completions",
                json={"prompt": "x", "max_tokens": 1},
            ) as r:
                answer = await r.json()
            assert answer["kv_transfer_params"]["remote_engine_id"] == "standin-engine"
            async with session.get(f"http://127.0.0.1:{ports[0]}/metrics") as r:
                metrics = await r.text()
            assert (
                f'standin_requests_total{{port="{ports[0]}",stream="true"}} {len(bodies)}'
                in metrics
            )
            assert f'standin_requests_total{{port="{ports[1]}",stream="false"}} 1' in metrics
            return out
    finally:
        await runner.cleanup()


def test_paired_ratios_divide_round_by_round_against_the_old_tree_and_the_router() -> None:
    def cell(*rounds: float) -> dict[str, object]:
        return {"c64": {"proxy_cpu_ms_per_round": list(rounds)}}

    results = {
        "coord rr": cell(0.6, 0.9, 0.5),
        "coord rr (old)": cell(0.8, 0.9, 1.0),
        "coord kv P/D chain": cell(2.0, 3.0, 2.0),
        "router rr": cell(0.3, 0.6, 0.25),
        "router P/D": cell(0.5, 1.0, 0.4),
        "direct": cell(0.0, 0.0, 0.0),  # no proxy: nothing to compare
    }
    ratios = paired_ratios(results, [64])["c64"]
    assert set(ratios) == {
        "coord rr / coord rr (old)",
        "coord rr / router rr",
        "coord rr (old) / router rr",
        "coord kv P/D chain / router P/D",
    }
    # Round by round, not the ratio of the sums: (0.6/0.3, 0.9/0.6, 0.5/0.25) = (2, 1.5, 2).
    assert ratios["coord rr / router rr"] == {
        "per_round": [2.0, 1.5, 2.0],
        "min": 1.5,
        "median": 2.0,
        "max": 2.0,
    }
    assert ratios["coord rr / coord rr (old)"]["per_round"] == [0.75, 1.0, 0.5]
    assert ratios["coord kv P/D chain / router P/D"]["median"] == 4.0
    table = ratios_table({"c64": ratios})
    assert "| coord rr / router rr | **2.00** | 1.50 | 2.00 | 2.00 1.50 2.00 |" in table


def test_standin_keeps_its_timing_and_token_count() -> None:
    standin = StandIn(ttft_ms=60, itl_ms=15)
    body = {"model": "standin", "prompt": "hi", "max_tokens": 5, "stream": True}
    [s] = asyncio.run(_measure(standin, [body]))
    assert s.ok and s.tokens == 5
    assert s.ttft_s is not None and 0.060 <= s.ttft_s < 0.060 + 0.2
    assert s.e2e_s >= 0.060 + 4 * 0.015
    assert s.e2e_s - s.ttft_s >= 4 * 0.015


def test_standin_is_fast_by_default() -> None:
    """The proxy benchmark assumes the stand-in adds next to nothing: 16 tokens back to back."""
    body = {"model": "standin", "prompt": "hi", "max_tokens": 16, "stream": True}
    samples = asyncio.run(_measure(StandIn(), [body] * 30))
    assert all(s.ok and s.tokens == 16 for s in samples)
    assert percentile([s.e2e_s for s in samples], 50) < 0.05  # ~2 ms here; generous when loaded


# ---- NIXL ---------------------------------------------------------------------------------------


def test_slots_are_distinct_and_the_pattern_exposes_misplaced_blocks() -> None:
    desc, local, remote = slots_for("block-4KiB", 256 * 1024, 1 << 20, np.random.default_rng(0))
    assert desc == 4096 and len(local) == len(remote) == 64
    assert len(set(local.tolist())) == 64 and int(remote.max()) < 256
    buf = np.empty(1 << 20, dtype=np.uint8)
    fill_pattern(buf)
    blocks = buf.reshape(256, 4096)
    assert not any(np.array_equal(blocks[0], blocks[i]) for i in range(1, 256))


def test_nixl_moves_the_right_bytes_between_two_processes() -> None:
    started = time.monotonic()
    rows = nixl_pair(
        "tcp,sm,self",
        1 << 20,
        layouts=["bulk", "block-4KiB"],
        sizes=[256 * 1024],
        ops=["READ", "WRITE"],
        min_reps=1,
        max_reps=2,
        min_time_s=0.0,
        timeout_s=60,
    )
    assert [(r["method"], r["layout"]) for r in rows] == [
        ("nixl READ tcp,sm,self", "bulk"),
        ("nixl WRITE tcp,sm,self", "bulk"),
        ("nixl READ tcp,sm,self", "block-4KiB"),
        ("nixl WRITE tcp,sm,self", "block-4KiB"),
    ]
    assert all(r["verified"] for r in rows), rows
    assert rows[2]["descs"] == 64 and rows[2]["gbps"] > 0
    assert time.monotonic() - started < 60
