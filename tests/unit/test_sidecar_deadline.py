"""The prefill call's total deadline: the estimator's arithmetic, and a prefill worker that hangs
(stand-ins: one that answers its first requests and then never again, like a worker stopped with
SIGSTOP while its port still accepts, and a socket that accepts connections but is never read),
whose requests are decoded locally once their deadline passes instead of after the 120 s timeout."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pd_runtime.sidecar.app import SidecarSettings, create_app
from pd_runtime.sidecar.deadline import DeadlinePolicy, PrefillDeadlines, PromptSize, prompt_size
from tests.servers import FakeEngine, serve, wait_for

# -- the estimator ---------------------------------------------------------------------------------

POLICY = DeadlinePolicy(floor_s=5.0, factor=4.0, ceiling_s=120.0, cold_s=15.0, slack_s=1.0)


def learned(seconds_per_token: float = 0.002, tokens_per_char: float = 0.25) -> PrefillDeadlines:
    """An estimator that has seen one prefill on "a" of 100 tokens (so 100 / tokens_per_char
    characters) taking 100 * seconds_per_token."""
    d = PrefillDeadlines(POLICY)
    d.observe("a", PromptSize(round(100 / tokens_per_char)), 100 * seconds_per_token, 100)
    return d


def test_cold_start_gets_the_cold_minimum_or_more_for_a_long_prompt() -> None:
    d = PrefillDeadlines(POLICY)
    short = d.deadline("a", PromptSize(40))
    assert short.cold and short.seconds == 15.0
    # Pessimistic defaults: 0.5 tokens per character, 2 ms per token.
    long = d.deadline("a", PromptSize(20_000))
    assert long.tokens == 10_000 and long.predicted_s == pytest.approx(20.0)
    assert long.seconds == pytest.approx(4 * 20.0 + 1)
    assert d.deadline("a", PromptSize(1_000_000)).seconds == 120.0  # the ceiling


def test_the_rate_is_learned_and_the_deadline_grows_with_the_prompt() -> None:
    d = learned(seconds_per_token=0.002, tokens_per_char=0.25)
    assert d.seconds_per_token("a") == pytest.approx(0.002)
    assert d.tokens_per_char() == pytest.approx(0.25)
    small = d.deadline("a", PromptSize(400))  # 100 tokens, 0.2 s: 4 * 0.2 + 1 is under the floor
    assert not small.cold and small.seconds == 5.0
    seconds = [d.deadline("a", PromptSize(chars)).seconds for chars in (8_000, 16_000, 32_000)]
    # 2000, 4000, 8000 tokens: 4 s, 8 s, 16 s predicted.
    assert seconds == pytest.approx([4 * 4 + 1, 4 * 8 + 1, 4 * 16 + 1])
    assert d.deadline("a", PromptSize(200_000)).seconds == 120.0
    # Token ids count as tokens exactly, text by the learned ratio.
    ids = d.deadline("a", PromptSize(chars=0, token_ids=4000))
    assert ids.tokens == 4000 and ids.seconds == pytest.approx(4 * 8 + 1)


def test_clamps_to_the_floor_and_to_the_prefill_timeout() -> None:
    policy = DeadlinePolicy(floor_s=2.0, factor=4.0, ceiling_s=10.0, cold_s=3.0, slack_s=1.0)
    d = PrefillDeadlines(policy)
    assert d.deadline("a", PromptSize(1)).seconds == 3.0  # cold
    assert d.deadline("a", PromptSize(10**6)).seconds == 10.0
    d.observe("a", PromptSize(4), 0.001, 1)
    assert d.deadline("a", PromptSize(4)).seconds == 2.0
    assert d.deadline("a", PromptSize(10**6)).seconds == 10.0
    # A cold minimum above the ceiling still stops at the ceiling.
    capped = PrefillDeadlines(DeadlinePolicy(floor_s=1.0, ceiling_s=5.0, cold_s=15.0))
    assert capped.deadline("a", PromptSize(1)).seconds == 5.0


def test_per_prefiller_rates_with_the_shared_one_for_a_new_prefiller() -> None:
    d = PrefillDeadlines(POLICY)
    d.observe("fast", PromptSize(4000), 1.0, 1000)  # 1 ms per token
    d.observe("slow", PromptSize(4000), 10.0, 1000)  # 10 ms per token
    size = PromptSize(8000)  # 2000 tokens
    assert d.deadline("fast", size).seconds == pytest.approx(4 * 2.0 + 1)
    assert d.deadline("slow", size).seconds == pytest.approx(4 * 20.0 + 1)
    shared = d.seconds_per_token()
    assert shared is not None and 0.001 < shared < 0.01
    new = d.deadline("new", size)
    assert new.cold and new.predicted_s == pytest.approx(shared * 2000)
    assert new.seconds == max(15.0, 4 * shared * 2000 + 1)
    assert d.deadline("new", PromptSize(40)).seconds == 15.0  # the cold minimum
    d.retain({"fast"})
    assert d.samples("fast") == 1 and d.samples("slow") == 0
    assert d.deadline("slow", size).cold


def test_samples_weigh_by_their_size() -> None:
    d = PrefillDeadlines(DeadlinePolicy(alpha=0.2))
    d.observe("a", PromptSize(20), 0.05, 5)  # 10 ms/token, mostly fixed overhead
    assert d.seconds_per_token("a") == pytest.approx(0.01)
    d.observe("a", PromptSize(8000), 2.0, 2000)  # 1 ms/token
    num, den = 0.05 + 0.2 * (2.0 - 0.05), 5 + 0.2 * (2000 - 5)
    assert d.seconds_per_token("a") == pytest.approx(num / den)
    # Close to the long prompt's 1 ms, not the mean of the two rates (5.5 ms).
    assert d.seconds_per_token("a") == pytest.approx(0.0011, abs=0.0001)
    assert d.samples("a") == d.samples() == 2


def test_cached_tokens_are_not_counted_as_computed_and_missing_usage_uses_the_estimate() -> None:
    d = PrefillDeadlines(POLICY)
    d.observe("a", PromptSize(4000), 0.1, 1000, cached_tokens=900)
    assert d.seconds_per_token("a") == pytest.approx(0.001)  # 100 computed tokens
    assert d.tokens_per_char() == pytest.approx(0.25)  # from all 1000 prompt tokens
    e = PrefillDeadlines(POLICY)
    e.observe("a", PromptSize(200), 0.5, None)  # cold estimate: 100 tokens
    assert e.seconds_per_token("a") == pytest.approx(0.005)
    assert e.tokens_per_char() == POLICY.cold_tokens_per_char  # nothing learned about tokens


def test_prompt_size_counts_text_and_token_ids() -> None:
    assert prompt_size({"prompt": "hello world"}) == PromptSize(11, 0)
    assert prompt_size({"prompt": ["ab", "cde"]}) == PromptSize(5, 0)
    assert prompt_size({"prompt": [1, 2, 3]}) == PromptSize(0, 3)
    assert prompt_size({"prompt": [[1, 2], [3]]}) == PromptSize(0, 3)
    chat = {
        "model": "a-long-model-name-that-is-not-prompt",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "abc"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "max_tokens": 7,
    }
    # role 4 + 2 + role 4 + "text" 4 + 3, tools "function" 8 + "f" 1
    assert prompt_size(chat) == PromptSize(4 + 2 + 4 + 4 + 3 + 8 + 1, 0)
    nested: list[Any] = ["x"]
    for _ in range(100_000):  # deeper than Python's recursion limit
        nested = [nested]
    assert prompt_size({"messages": nested}) == PromptSize(1, 0)


def test_settings_refuse_a_nonsense_deadline() -> None:
    base = {"decode_url": "http://127.0.0.1:1", "allowed_prefillers": frozenset()}
    with pytest.raises(ValueError, match="prefill_deadline_factor"):
        SidecarSettings(**base, prefill_deadline_factor=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefill_deadline_floor_s"):
        SidecarSettings(**base, prefill_deadline_floor_s=0)  # type: ignore[arg-type]
    policy = SidecarSettings(**base, prefill_timeout_s=60).deadline_policy()  # type: ignore[arg-type]
    assert (policy.floor_s, policy.factor, policy.cold_s, policy.ceiling_s) == (5, 4, 15, 60)


# -- the settings reach the sidecar from the deployment config and the command line ---------------

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"


def test_deployment_settings_reach_the_sidecar_through_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pd_runtime import cli
    from pd_runtime.common import server
    from pd_runtime.config import DeploymentConfig
    from pd_runtime.config.loader import parse_config
    from pd_runtime.launcher.topology import plan_deployment
    from pd_runtime.platform import Platform

    data = yaml.safe_load(LOCAL.read_text())
    data["sidecar"].update(
        prefill_timeout_s=60,
        prefill_deadline_floor_s=3,
        prefill_deadline_factor=6,
        prefill_deadline_cold_s=20,
        header_timeout_s=7,
    )
    plan = plan_deployment(
        parse_config(DeploymentConfig, data), tmp_path, Platform("cpu", 0, (0, 1))
    )
    argv = plan.by_kind("sidecar")[0].argv
    assert argv[1:3] == ["-m", "pd_runtime"]
    started: list[FastAPI] = []
    monkeypatch.setattr(server, "run_server", lambda app, **_: started.append(app))
    monkeypatch.setattr("pd_runtime.logging_setup.setup_logging", lambda *_: None)
    assert cli.main(argv[3:]) == 0
    settings = started[0].state.settings
    assert settings.prefill_timeout_s == 60
    assert settings.prefill_deadline_floor_s == 3
    assert settings.prefill_deadline_factor == 6
    assert settings.prefill_deadline_cold_s == 20
    assert settings.header_timeout_s == 7
    defaults = cli.build_parser().parse_args(["sidecar", "--port", "1", "--decode-url", "x"])
    assert (
        defaults.prefill_deadline_floor_s,
        defaults.prefill_deadline_factor,
        defaults.prefill_deadline_cold_s,
    ) == (5.0, 4.0, 15.0)


def test_the_command_line_refuses_a_factor_under_one(capsys: pytest.CaptureFixture[str]) -> None:
    from pd_runtime import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(
            ["sidecar", "--port", "1", "--decode-url", "x", "--prefill-deadline-factor", "0.5"]
        )
    assert "must be >= 1" in capsys.readouterr().err


# -- a prefill worker that hangs ------------------------------------------------------------------


@dataclass
class HangingPrefill:
    """Answers its first ``answer_first`` prefills like vLLM (after ``seconds_per_word`` per
    prompt word; ``usage.prompt_tokens`` = words), then never answers again; records when the
    sidecar closes a request it holds (vLLM would abort it)."""

    answer_first: int
    seconds_per_word: float = 0.001
    requests: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[int] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def generate(request: Request) -> Response:
            body = json.loads(await request.body())
            self.requests.append(body)
            number = len(self.requests)
            if number > self.answer_first:
                await FakeEngine._client_left(request, 600)
                self.aborted.append(number)
                return Response(status_code=499)
            words = len(str(body["prompt"]).split())
            await asyncio.sleep(self.seconds_per_word * words)
            return JSONResponse(
                {
                    "id": f"p{number}",
                    "choices": [{"index": 0, "text": "x"}],
                    "usage": {"prompt_tokens": words, "completion_tokens": 1},
                    "kv_transfer_params": {
                        "remote_engine_id": "prefill-engine",
                        "remote_block_ids": [number],
                        "remote_host": "127.0.0.1",
                        "remote_port": 5600,
                    },
                }
            )

        return app


@contextmanager
def chain(
    prefill_app: FastAPI | None = None, prefiller: str | None = None, **settings: Any
) -> Iterator[tuple[str, FakeEngine, str, FastAPI]]:
    """A real sidecar in front of a fake decode engine, trusting one prefiller (served from
    ``prefill_app``, or the given HOST:PORT). Yields ``(sidecar_url, decode, prefiller, app)``."""
    decode = FakeEngine("decode")
    with serve(decode.app()) as decode_url, _maybe_serve(prefill_app) as prefill_url:
        address = prefiller or prefill_url.removeprefix("http://")
        app = create_app(
            SidecarSettings(
                decode_url=decode_url, allowed_prefillers=frozenset({address}), **settings
            )
        )
        with serve(app) as sidecar_url:
            yield sidecar_url, decode, address, app


@contextmanager
def _maybe_serve(app: FastAPI | None) -> Iterator[str]:
    if app is None:
        yield ""
    else:
        with serve(app) as url:
            yield url


def words(n: int) -> str:
    return " ".join(f"w{i:04d}" for i in range(n))


def post(sidecar: str, prefiller: str, prompt: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = httpx.post(
        f"{sidecar}/v1/completions",
        json={"model": "m", "prompt": prompt, "max_tokens": 5},
        headers={"x-prefiller-host-port": prefiller},
        timeout=200,
    )
    return time.monotonic() - started, response


def metric(sidecar: str, name: str) -> float:
    for line in httpx.get(f"{sidecar}/sidecar/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the sidecar's metrics")


def test_requests_held_by_a_hung_prefill_worker_fall_back_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Default settings: floor 5 s, factor 4, prefill_timeout_s 120 (a per-read timeout, which
    # alone let a hung worker hold every request for 120 s).
    prefill = HangingPrefill(answer_first=3)
    with chain(prefill.app()) as (sidecar, decode, prefiller, app):
        for _ in range(3):
            assert post(sidecar, prefiller, words(20))[1].status_code == 200
        assert [r.get("kv_transfer_params") is not None for r in decode.requests] == [True] * 3
        assert app.state.deadlines.samples(prefiller) == 3
        # The worker hangs now, with 8 requests in flight.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: post(sidecar, prefiller, words(20)), range(8)))
        assert [r.status_code for _, r in results] == [200] * 8
        slowest = max(elapsed for elapsed, _ in results)
        assert 5.0 <= slowest < 5.0 + 3.0, slowest  # the floor, far below the 120 s timeout
        assert all("kv_transfer_params" not in r for r in decode.requests[3:])
        assert len(decode.requests) == 11
        assert metric(sidecar, "pd_sidecar_prefill_deadline_exceeded_total") == 8
        assert metric(sidecar, 'pd_sidecar_requests_total{mode="fallback"}') == 8
        assert metric(sidecar, 'pd_sidecar_requests_total{mode="disaggregated"}') == 3
        # Every held prefill was closed (vLLM aborts it), and none fed the rate estimate.
        wait_for(lambda: len(prefill.aborted) == 8, what="the prefill worker to see 8 aborts")
        assert app.state.deadlines.samples(prefiller) == 3
        warnings = [r.getMessage() for r in caplog.records if r.name == "pd_runtime.sidecar"]
        assert sum(f"prefill on {prefiller} passed its 5.0s deadline" in w for w in warnings) == 8


def test_a_long_prompt_gets_the_longer_deadline_its_learned_rate_predicts() -> None:
    # 2.5 ms per word: the 400-word prompt takes 1 s, four times the 0.25 s floor.
    prefill = HangingPrefill(answer_first=4, seconds_per_word=0.0025)
    settings = {"prefill_deadline_floor_s": 0.25, "prefill_deadline_cold_s": 2.0}
    with chain(prefill.app(), **settings) as (sidecar, decode, prefiller, app):
        for _ in range(3):
            assert post(sidecar, prefiller, words(20))[1].status_code == 200  # 50 ms each
        deadlines = app.state.deadlines
        assert deadlines.seconds_per_token(prefiller) == pytest.approx(0.0025, rel=0.5)
        long = deadlines.deadline(prefiller, prompt_size({"prompt": words(400)}))
        assert 4.0 < long.seconds < 15.0, long
        elapsed, response = post(sidecar, prefiller, words(400))
        assert response.status_code == 200 and elapsed > 0.9
        assert decode.requests[-1]["kv_transfer_params"]["remote_block_ids"] == [4]
        assert metric(sidecar, 'pd_sidecar_requests_total{mode="disaggregated"}') == 4
        # Now the worker hangs: the same prompt gets that learned deadline, not the 120 s timeout.
        deadline = deadlines.deadline(prefiller, prompt_size({"prompt": words(400)})).seconds
        elapsed, response = post(sidecar, prefiller, words(400))
        assert response.status_code == 200
        assert deadline <= elapsed < deadline + 3.0
        assert metric(sidecar, 'pd_sidecar_requests_total{mode="fallback"}') == 1


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A port whose connections the kernel accepts (backlog) and nobody ever reads, like a
    stopped process's listening socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_cold_start_a_worker_that_never_answered_gets_the_cold_deadline(black_hole: str) -> None:
    settings = {"prefill_deadline_floor_s": 0.5, "prefill_deadline_cold_s": 1.5}
    with chain(prefiller=black_hole, **settings) as (sidecar, decode, prefiller, app):
        results: list[tuple[float, httpx.Response]] = []
        threads = [
            threading.Thread(target=lambda: results.append(post(sidecar, prefiller, "hi")))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r.status_code for _, r in results] == [200] * 3
        assert all(1.5 <= elapsed < 1.5 + 3.0 for elapsed, _ in results), results
        assert all("kv_transfer_params" not in r for r in decode.requests)
        assert metric(sidecar, "pd_sidecar_prefill_deadline_exceeded_total") == 3
        assert metric(sidecar, 'pd_sidecar_requests_total{mode="fallback"}') == 3
        assert app.state.deadlines.samples(prefiller) == 0
