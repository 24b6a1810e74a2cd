"""A starting worker's phases, read from its log: on a real vLLM-CPU start (captured), on GPU lines
written from vLLM's own format strings, and on a log that grows while it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_runtime.worker.startup import PHASES, LogFollower, StartupPhases

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm_startup"

# vLLM 0.32's GPU-only lines, from its format strings (gpu_model_runner.py, mem_utils.py,
# compilation/backends.py, core.py), as two tensor-parallel ranks write them.
GPU_LINES = """\
(EngineCore_DP0 pid=1) INFO 11-29 10:00:01 [core.py:93] Initializing a V1 LLM engine (v0.32.0) with config: model='Qwen/Qwen3-0.6B'
(Worker_TP0 pid=2) INFO 11-29 10:00:09 [gpu_model_runner.py:5040] Starting to load model Qwen/Qwen3-0.6B...
(Worker_TP1 pid=3) INFO 11-29 10:00:09 [gpu_model_runner.py:5040] Starting to load model Qwen/Qwen3-0.6B...
(Worker_TP0 pid=2) INFO 11-29 10:00:40 [gpu_model_runner.py:5150] Model loading took 65.7 GiB memory and 30.512345 seconds
(Worker_TP1 pid=3) INFO 11-29 10:00:41 [gpu_model_runner.py:5150] Model loading took 65.7 GiB memory and 31.100000 seconds
(Worker_TP0 pid=2) INFO 11-29 10:00:55 [backends.py:399] Compiling a graph for compile range (1, 8192) takes 12.31 s
(Worker_TP0 pid=2) INFO 11-29 10:01:05 [mem_utils.py:218] Memory profiling takes 9.87 seconds. Total non-torch memory: 1.2GiB
(EngineCore_DP0 pid=1) INFO 11-29 10:01:06 [kv_cache_utils.py:2328] GPU KV cache size: 1,234,560 tokens, Maximum concurrency for 8,192 tokens per request: 150.70x
Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  50%|#####     | 34/67 [00:03<00:03, 10.1it/s]
Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 67/67 [00:06<00:00, 10.2it/s]
(Worker_TP0 pid=2) INFO 11-29 10:01:20 [gpu_model_runner.py:6582] Graph capturing finished in 14 secs, took 0.52 GiB
(EngineCore_DP0 pid=1) INFO 11-29 10:01:21 [core.py:396] init engine (profile, create kv cache, warmup model) took 79.20 s (compilation: 12.31 s)
(APIServer pid=0) INFO 11-29 10:01:25 [entry.py:140] Starting vLLM server on http://10.0.0.5:8100
INFO:     Application startup complete.
"""


def phases(lines: list[str]) -> list[str]:
    parser = StartupPhases()
    return [label for label in map(parser.feed, lines) if label is not None]


def test_a_real_vllm_cpu_start_reads_as_its_phases() -> None:
    lines = LogFollower(FIXTURES / "cpu-decode.log").lines()
    assert phases(lines) == [
        "vLLM API server starting",
        "engine starting",
        "loading the model",
        "weights loaded in 0.01s",
        "KV cache 524,288 tokens",
        "NIXL agent starting",
        "KV cache registered with NIXL",
        "engine ready (profile, KV cache, warm-up took 2.43s)",
        "HTTP server starting",
        "HTTP server up",
    ]


def test_a_gpu_start_reports_each_phase_once_across_ranks_and_progress_bars() -> None:
    assert phases(GPU_LINES.splitlines()) == [
        "engine starting",
        "loading the model",
        "model loaded (65.7 GiB) in 30.512345s",
        "torch.compile compiling graphs",
        "memory profiled in 9.87s",
        "KV cache 1,234,560 tokens",
        "capturing CUDA graphs",
        "CUDA graphs captured in 14s",
        "engine ready (profile, KV cache, warm-up took 79.20s)",
        "HTTP server starting",
        "HTTP server up",
    ]


@pytest.mark.parametrize(
    "line",
    [
        "",
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        'INFO:     127.0.0.1:37950 - "GET /health HTTP/1.1" 200 OK',
        "\x00\xff garbage \u2588",
        "KV cache size: lots of tokens",  # reworded numbers: not a phase
    ],
)
def test_unknown_lines_are_ignored(line: str) -> None:
    assert StartupPhases().feed(line) is None


def test_every_label_fills_from_its_pattern() -> None:
    for pattern, label in PHASES:
        names = set(pattern.groupindex)
        assert all("{" + name + "}" in label for name in names), label


def test_the_follower_returns_complete_lines_as_the_log_grows(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    assert LogFollower(log).lines() == []  # not written yet
    log.write_bytes(b"old start\n")
    follower = LogFollower(log, offset=log.stat().st_size)  # a restart: only what comes next
    with log.open("ab") as f:
        f.write(b"Starting to load model m...\nhalf a li")
        f.flush()
        assert follower.lines() == ["Starting to load model m..."]
        f.write(b"ne\rbar 50%\rbar 100%\n")
        f.flush()
        assert follower.lines() == ["half a line", "bar 50%", "bar 100%"]
    assert follower.lines() == []
