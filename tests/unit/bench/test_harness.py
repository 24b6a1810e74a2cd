"""The benchmark harness measured against a stand-in server with known timing (tests/servers.py's
FakeEngine: a first-byte delay ``hang_s``, then ``chunks`` SSE chunks ``chunk_delay_s`` apart,
usage at the end like vLLM with include_usage), plus the schedule, the closed loop and every
workload."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from pd_runtime.bench.client import RequestRecord
from pd_runtime.bench.metrics import meets_slos, parse_slos, summarize
from pd_runtime.bench.runner import (
    BenchConfig,
    build_conversations,
    poisson_schedule,
    run_bench,
)
from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import WORKLOADS, make_workload
from tests.servers import FakeEngine, serve


def _cfg(url: str, **kw: object) -> BenchConfig:
    return BenchConfig(base_url=url, model="m", progress=False, **kw)  # type: ignore[arg-type]


async def test_timing_and_token_counts_match_the_stand_in() -> None:
    engine = FakeEngine("e", hang_s=0.2, chunks=5, chunk_delay_s=0.05, stream_usage=True)
    work = make_workload("random", {"input_len": "40", "output_len": "5"})
    convs = build_conversations(work, TextGen(None), 3, seed=1)
    with serve(engine.app()) as url:
        result = await run_bench(convs, _cfg(url, concurrency=1))
    assert [r.error for r in result.records] == [None] * 3
    for rec, conv in zip(result.records, convs, strict=False):
        assert rec.ttft_s is not None and rec.e2e_s is not None and rec.tpot_s is not None
        assert len(rec.itl_s) == 4
        assert rec.output_tokens == 5
        assert rec.prompt_tokens == len(conv.turns[0].text.split()) == 40
        # Nothing can arrive before the stand-in's sleeps: 200 ms first byte, 5 x 50 ms chunks.
        assert rec.ttft_s >= 0.2 and rec.e2e_s >= 0.2 + 5 * 0.05
    # Upper bounds on medians: one stall of a loaded machine (the stand-in shares this process)
    # moves a single value, not the median of 3 requests or of 12 gaps.
    assert statistics.median(r.ttft_s for r in result.records) < 0.35
    gaps = [x for r in result.records for x in r.itl_s]
    assert 0.045 <= statistics.median(gaps) < 0.1, gaps
    assert 0.045 <= statistics.median(r.tpot_s for r in result.records) < 0.1
    assert statistics.median(r.e2e_s for r in result.records) < 0.7
    # what the harness sent: streaming with usage, exact lengths
    body = engine.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["ignore_eos"] is True
    s = summarize(result.records, result.duration_s, {})
    assert s["requests"] == 3 and s["errors"] == 0 and s["output_tokens"] == 15
    assert 200 <= s["ttft_p50_ms"] < 350
    assert s["throughput_rps"] == pytest.approx(3 / result.duration_s, rel=1e-3)
    assert s["output_tok_s"] == pytest.approx(15 / result.duration_s, rel=1e-3)


@pytest.mark.parametrize(
    ("engine", "error"),
    [
        (FakeEngine("e", fail_with=500), "http_500"),
        (FakeEngine("e", chunks=4, break_stream_after=2), ""),  # broken stream, no [DONE]
    ],
)
async def test_failures_are_counted_as_errors(engine: FakeEngine, error: str) -> None:
    convs = build_conversations(make_workload("random"), TextGen(None), 4, seed=0)
    with serve(engine.app()) as url:
        result = await run_bench(convs, _cfg(url, concurrency=2))
    assert len(result.records) == 4
    assert all(r.error and r.error.startswith(error) for r in result.records)
    s = summarize(result.records, result.duration_s, {})
    assert s["errors"] == 4 and s["throughput_rps"] == 0 and s["ttft_p50_ms"] is None


async def test_connection_refused_is_an_error_not_an_exception() -> None:
    with serve(FakeEngine("e").app()) as url:
        pass  # the server is gone: its port refuses connections now
    convs = build_conversations(make_workload("random"), TextGen(None), 2, seed=0)
    result = await run_bench(convs, _cfg(url, concurrency=1, timeout_s=5))
    assert [bool(r.error) for r in result.records] == [True, True]


def _rec(ttft: float, e2e: float, tokens: int, itl: list[float], error: str | None = None):
    return RequestRecord("c", 0, 0.0, ttft, itl, e2e, 10, tokens, error)


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    slos = parse_slos(["ttft_ms=500", "tpot_ms=50"])
    records = [
        _rec(0.1, 0.1 + 9 * 0.04, 10, [0.04] * 9),  # meets both
        _rec(0.6, 0.6 + 9 * 0.04, 10, [0.04] * 9),  # TTFT too slow
        _rec(0.1, 0.1 + 9 * 0.06, 10, [0.06] * 9),  # TPOT too slow
        _rec(0.4, 0.4, 1, []),  # one token: no TPOT to violate
        _rec(0.1, 0.2, 10, [0.01] * 9, error="http_500"),  # failed: never good
    ]
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    s = summarize(records, duration_s=2.0, slos=slos)
    assert s["goodput_rps"] == 1.0 and s["throughput_rps"] == 2.0 and s["errors"] == 1
    assert summarize(records, 2.0, {})["goodput_rps"] == 2.0
    with pytest.raises(ValueError):
        parse_slos(["latency=3"])


def test_poisson_schedule_is_reproducible_with_the_right_mean_rate() -> None:
    a, b = poisson_schedule(4000, 8.0, seed=7), poisson_schedule(4000, 8.0, seed=7)
    assert a == b and a[0] == 0.0
    assert a != poisson_schedule(4000, 8.0, seed=8)
    assert all(x < y for x, y in itertools.pairwise(a))
    assert (len(a) - 1) / a[-1] == pytest.approx(8.0, rel=0.05)
    gaps = sorted(y - x for x, y in itertools.pairwise(a))
    # exponential gaps: the median is ln 2 / rate, not the mean 1 / rate
    assert gaps[len(gaps) // 2] == pytest.approx(0.6931 / 8.0, rel=0.1)


def _max_overlap(records: list[RequestRecord]) -> int:
    events = [(r.start_s, 1) for r in records] + [(r.start_s + (r.e2e_s or 0), -1) for r in records]
    now = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        now += step
        peak = max(peak, now)
    return peak


async def test_closed_loop_never_exceeds_the_concurrency() -> None:
    engine = FakeEngine("e", chunks=3, chunk_delay_s=0.03)
    convs = build_conversations(make_workload("random"), TextGen(None), 12, seed=0)
    with serve(engine.app()) as url:
        result = await run_bench(convs, _cfg(url, concurrency=3))
    assert len(result.records) == 12 and result.max_in_flight == 3
    assert _max_overlap(result.records) <= 3


async def test_open_loop_follows_the_seeded_schedule() -> None:
    engine = FakeEngine("e", chunks=2, chunk_delay_s=0.01)
    convs = build_conversations(make_workload("random"), TextGen(None), 10, seed=5)
    with serve(engine.app()) as url:
        result = await run_bench(convs, _cfg(url, rate=40.0, seed=5))
    assert result.schedule == poisson_schedule(10, 40.0, 5)
    starts = sorted(r.start_s for r in result.records)
    for planned, actual in zip(result.schedule, starts, strict=False):
        assert planned <= actual < planned + 0.3


def test_same_seed_same_prompts() -> None:
    text = TextGen(None)
    for name in WORKLOADS.names():
        work = make_workload(name)
        assert build_conversations(work, text, 8, 3) == build_conversations(work, text, 8, 3)
        assert build_conversations(work, text, 8, 3) != build_conversations(work, text, 8, 4)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pd_runtime.model.tiny import _tokenizer_json

    path = tmp_path_factory.mktemp("tok")
    (path / "tokenizer.json").write_text(_tokenizer_json(2048))
    return str(path)


def test_prompt_lengths_follow_the_tokenizer(tokenizer_dir: str) -> None:
    text = TextGen(tokenizer_dir)
    assert text.exact and len(text.pool) > 100
    rng = random.Random(0)
    for n in (1, 17, 256, 1000):
        assert abs(text.count(text.words(rng, n)) - n) <= 1


@pytest.mark.parametrize("name", WORKLOADS.names())
async def test_every_workload_completes(name: str, tokenizer_dir: str) -> None:
    engine = FakeEngine("e", chunks=2, chunk_delay_s=0.001, stream_usage=True)
    small = {
        "random": {"input_len": 64},
        "shared-prefix": {"groups": 2, "prompts_per_group": 3, "prefix_len": 64},
        "multi-turn": {"turns": 3, "system_len": 32},
        "long-doc": {"documents": 2, "doc_len": 300},
    }[name]
    text = TextGen(tokenizer_dir)
    convs = build_conversations(make_workload(name, small), text, 6, seed=0)
    with serve(engine.app()) as url:
        result = await run_bench(convs, _cfg(url, concurrency=2))
    assert len(result.records) == 6 and all(r.ok for r in result.records)
    assert sum(r.output_tokens for r in result.records) == 12
    if name == "multi-turn":
        sessions = {h["x-session-id"] for h in engine.headers}
        assert len(sessions) == 2
        # each later turn resends the conversation with the earlier answer appended
        turn3 = max(engine.requests, key=lambda b: len(b["messages"]))["messages"]
        assert [m["role"] for m in turn3] == ["system", "user", "assistant"] * 1 + [
            "user",
            "assistant",
            "user",
        ]
        assert turn3[2]["content"] == "t0t1"
    if name == "shared-prefix":
        prompts = [b["prompt"] for b in engine.requests]
        prefix_words = {" ".join(p.split()[:60]) for p in prompts}
        assert len(prefix_words) == 2  # two groups, one prefix each
    if name == "long-doc":
        assert all(abs(text.count(b["prompt"]) - 300 - 24 - 3) < 8 for b in engine.requests)


def test_pd_runtime_bench_command_writes_the_run_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from pd_runtime.cli import main

    engine = FakeEngine("e", chunks=3, chunk_delay_s=0.001, stream_usage=True)
    out = tmp_path / "run.json"
    with serve(engine.app()) as url:
        argv = ["bench", "--base-url", url, "--model", "m", "--workload", "shared-prefix"]
        argv += [
            "--param",
            "groups=2",
            "--param",
            "prompts_per_group=2",
            "--param",
            "prefix_len=20",
        ]
        argv += ["--num-requests", "4", "--concurrency", "2", "--slo", "ttft_ms=10000"]
        assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["requests"] == 4 and data["summary"]["errors"] == 0
    assert data["summary"]["goodput_rps"] == data["summary"]["throughput_rps"] > 0
    assert data["config"]["workload_params"]["groups"] == 2
    assert len(data["records"]) == 4 and all(r["output_tokens"] == 3 for r in data["records"])
    assert main(["bench", "--base-url", url, "--model", "m", "--slo", "bogus=1"]) == 2


async def test_tokens_that_detokenize_to_nothing_still_count() -> None:
    """A stand-in streaming three choices with empty text (a model's tokens can detokenize to
    nothing): a success with TTFT at the first choice, not 'no tokens generated'."""
    import asyncio as aio
    import json

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    async def sse():  # type: ignore[no-untyped-def]
        await aio.sleep(0.1)
        for _ in range(3):
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': ''}]})}\n\n".encode()
            await aio.sleep(0.02)
        usage = {"prompt_tokens": 5, "completion_tokens": 3}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        return StreamingResponse(sse(), media_type="text/event-stream")

    convs = build_conversations(make_workload("random"), TextGen(None), 1, seed=0)
    with serve(app) as url:
        result = await run_bench(convs, _cfg(url, concurrency=1))
    (rec,) = result.records
    assert rec.ok and rec.text == "" and rec.output_tokens == 3
    assert rec.ttft_s is not None and 0.1 <= rec.ttft_s < 0.2 and len(rec.itl_s) == 2
