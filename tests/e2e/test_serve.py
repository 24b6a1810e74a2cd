"""``pd-runtime serve MODEL --prefill 1 --decode 1``: a deployment from flags alone, as a user
starts it (a subprocess, its output read as printed), before the shared deployment starts
(``own_deployment``) on ports of its own (12000-12999; the shared one is on the shipped ports +
1000). Shown: the start-up progress of each worker (phases from its vLLM log) in serve's output,
a vLLM flag passed through to the workers (``--max-num-seqs``), a greedy request served
disaggregated (the coordinator's decision names the prefill worker, and the decode worker's NIXL
count rose), and SIGINT stopping every part. Two workers start in ~30-50 s each on 2 cores."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.demo import DEMO_PROMPT, pod_score_lines
from pd_runtime.launcher.status import STATUS_FILE
from pd_runtime.launcher.supervisor import _child_setup
from tests.e2e.conftest import _tail, parts_left, stop_launcher

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment]

REPO = Path(__file__).resolve().parents[2]
NIXL = "vllm:nixl_xfer_time_seconds_count"
PORTS = {
    "--port": 12000, "--prefill-port": 12100, "--decode-port": 12200, "--sidecar-port": 12300,
    "--side-channel-port": 12400, "--kv-events-port": 12500, "--kv-events-replay-port": 12600,
}  # fmt: skip
READY_TIMEOUT_S = 600


def test_serve_starts_a_deployment_from_flags_serves_pd_and_stops_on_sigint(
    tmp_path: Path,
) -> None:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    model = cache / "models" / "tiny-qwen3-e2e"
    run_dir, out_path = tmp_path / "run", tmp_path / "serve.out"
    argv = [
        sys.executable, "-m", "pd_runtime", "serve", str(model), "--generate", "tiny",
        "--served-model-name", "tiny-qwen3", "--prefill", "1", "--decode", "1",
        *(word for flag, port in PORTS.items() for word in (flag, str(port))),
        "--run-dir", str(run_dir), "--scheduler-param", "pd_threshold_tokens=64",
        "--max-num-seqs", "16",  # vLLM's, for every worker
    ]  # fmt: skip
    started = time.monotonic()
    with out_path.open("wb") as out:
        serve = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(_child_setup, None),  # SIGTERM'd if pytest dies
        )
    pids: list[int] = []
    try:
        while "\ngateway: " not in "\n" + out_path.read_text(errors="replace"):
            assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(out_path)}"
            assert time.monotonic() - started < READY_TIMEOUT_S, _tail(out_path)
            time.sleep(1)
        print(f"[e2e] serve answering after {time.monotonic() - started:.0f}s")
        output = out_path.read_text()
        assert "gateway: http://127.0.0.1:12000" in output
        # Each worker's start-up, phase by phase, before it was healthy.
        for worker in ("prefill-0", "decode-0"):
            for phase in ("loading the model", "KV cache", "HTTP server up"):
                assert f"[serve] {worker}: {phase}" in output, output
        pids = [p["pid"] for p in json.loads((run_dir / STATUS_FILE).read_text())["parts"]]
        assert len(pids) == 4  # prefill, decode, sidecar, coordinator
        assert "'max_num_seqs': 16" in (run_dir / "decode-0.log").read_text()

        nixl_before = scrape_metrics("http://127.0.0.1:12200/metrics").get(NIXL, 0.0)
        response = httpx.post(
            "http://127.0.0.1:12000/v1/completions",
            json={"model": "tiny-qwen3", "prompt": DEMO_PROMPT, "max_tokens": 8,
                  "temperature": 0},
            headers={"x-request-id": "serve-e2e-1"},
            timeout=300,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
        decision = pod_score_lines(run_dir / "coordinator.log", ["serve-e2e-1"])["serve-e2e-1"]
        assert decision["prefill"] == "127.0.0.1:12100", decision
        assert scrape_metrics("http://127.0.0.1:12200/metrics")[NIXL] >= nixl_before + 1
    finally:
        stopped = stop_launcher(serve, signal.SIGINT)  # Ctrl-C
    output = out_path.read_text()
    assert stopped, f"serve did not stop within 60s of SIGINT:\n{_tail(out_path)}"
    assert serve.returncode == 0, _tail(out_path)
    assert "[serve] stopping..." in output and "[serve] all parts stopped" in output
    left = parts_left(pids)
    assert not left, f"parts alive after serve stopped: {left}"
    print(f"[e2e] serve test took {time.monotonic() - started:.0f}s")
