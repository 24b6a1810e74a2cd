"""The decision line: its breakdown at INFO covers the top-k endpoints, at DEBUG all of them; it
stays JSON the demo parses; records are written by the logging listener thread, not the loop."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.coordinator.app import create_app, pod_scores_line
from pd_runtime.demo import pod_score_lines
from pd_runtime.errors import ConfigError
from pd_runtime.kv_events.events import BlockStored, encode_token_ids
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest, SchedulingResult
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from tests.servers import FakeEngine, serve

BS = 4
PROMPT = list(range(1000, 1020))
DECODES = [f"127.0.0.1:{9000 + i}" for i in range(16)]
PREFILLS = [f"127.0.0.1:{9100 + i}" for i in range(6)]


def scheduler(**params: Any) -> KVAwareScheduler:
    endpoints = [
        EndpointConfig(name=f"d{i}", role="decode", address=a, url=f"http://{a}")
        for i, a in enumerate(DECODES)
    ] + [
        EndpointConfig(name=f"p{i}", role="prefill", address=a, url=f"http://{a}")
        for i, a in enumerate(PREFILLS)
    ]
    defaults: dict[str, Any] = {
        "tokenizer": None,
        "block_size": BS,
        "pd_threshold_tokens": 8,
        "seed": 0,
    }
    return KVAwareScheduler(endpoints, **{**defaults, **params})


def request(rid: str = "r") -> SchedulingRequest:
    return SchedulingRequest(
        rid,
        "m",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 10},
        token_ids=PROMPT,
        block_keys=PrefixIndex.block_keys(PROMPT, BS),
    )


def hold(s: KVAwareScheduler, address: str, blocks: int) -> None:
    """``address`` holds the prompt's first ``blocks`` blocks (its KV events say so)."""
    hashes = [hash((address, i)) & (2**63 - 1) for i in range(blocks)]
    s.index.apply(
        address,
        BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=encode_token_ids(PROMPT[: blocks * BS]),
            block_size=BS,
            lora_id=None,
        ),
    )


def top(totals: dict[str, float], k: int) -> set[str]:
    return set(sorted(totals, key=totals.__getitem__, reverse=True)[:k])


@pytest.mark.parametrize("k", [1, 4])
def test_the_breakdown_covers_the_top_k_endpoints_of_each_profile(k: int) -> None:
    s = scheduler(log_breakdown_top_k=k)
    result = s.schedule(request())  # cached nowhere: disaggregated
    assert result.disaggregated and result.breakdown is not None
    assert result.full_breakdown is not None
    full = result.full_breakdown()
    assert set(full["total"]) == set(DECODES) | set(PREFILLS)
    decode_totals = {a: v for a, v in full["total"].items() if a in DECODES}
    prefill_totals = {a: v for a, v in full["total"].items() if a in PREFILLS}
    kept = set(result.breakdown["total"])
    assert result.decode.address in kept and result.prefill is not None
    assert result.prefill.address in kept
    assert len(kept & set(DECODES)) in (k, k + 1) and len(kept & set(PREFILLS)) in (k, k + 1)
    # Ties broken at random may put the picked one outside the strict top k: it is kept as well.
    assert kept - {result.decode.address, result.prefill.address} <= (
        top(decode_totals, k) | top(prefill_totals, k)
    )
    assert set(result.breakdown) == set(full)  # every scorer is there, for fewer endpoints
    for scorer, values in result.breakdown.items():
        assert values == {a: v for a, v in full[scorer].items() if a in kept}


def test_the_top_k_are_the_best_totals() -> None:
    s = scheduler(log_breakdown_top_k=2)
    hold(s, DECODES[5], 5)
    hold(s, DECODES[9], 4)
    result = s.schedule(request())
    assert result.breakdown is not None and not result.disaggregated
    assert set(result.breakdown["total"]) == {DECODES[5], DECODES[9]}
    assert result.decode.address == DECODES[5]


def test_zero_logs_no_breakdown_and_a_negative_k_is_refused() -> None:
    result = scheduler(log_breakdown_top_k=0).schedule(request())
    assert result.breakdown == {}
    assert result.full_breakdown is not None
    assert len(result.full_breakdown()["total"]) == len(DECODES) + len(PREFILLS)
    with pytest.raises(ConfigError, match="log_breakdown_top_k"):
        scheduler(log_breakdown_top_k=-1)


def test_the_line_is_top_k_at_info_and_whole_at_debug_and_the_demo_parses_it(
    tmp_path: Path,
) -> None:
    s = scheduler()  # default k = 4
    result = s.schedule(request("req-1"))
    info = pod_scores_line("req-1", "m", result)
    debug = pod_scores_line("req-2", "m", result, full=True)
    log = tmp_path / "coordinator.log"
    log.write_text(
        f"2026-01-01 00:00:00,000 INFO pd_runtime.coordinator: {info}\n"
        f"2026-01-01 00:00:00,001 INFO pd_runtime.coordinator: {debug}\n"
    )
    records = pod_score_lines(log, ["req-1", "req-2"])
    for record in records.values():
        assert set(record) == {"x-request-id", "model", "scores", "target", "prefill", "reason",
                               "breakdown"}  # fmt: skip
        assert record["target"] == result.decode.address
        assert record["prefill"] == (result.prefill.address if result.prefill else None)
        assert record["reason"] == result.reason and record["scores"] is None
    short, whole = records["req-1"]["breakdown"], records["req-2"]["breakdown"]
    assert isinstance(short, dict) and isinstance(whole, dict)
    assert len(short["total"]) <= 2 * 5
    assert len(whole["total"]) == len(DECODES) + len(PREFILLS)
    assert len(info) < len(debug) / 2


def test_a_result_without_a_full_breakdown_logs_what_it_has() -> None:
    decode = EndpointConfig(name="d", role="decode", address="h:1", url="http://h:1")
    result = SchedulingResult(decode=decode, prefill=None, breakdown={"total": {"h:1": 1.0}})
    assert '"breakdown":{"total":{"h:1":1.0}}' in pod_scores_line("r", "m", result, full=True)


def test_the_coordinator_logs_top_k_at_info_and_all_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeEngine("sidecar")
    with serve(fake.app()) as sidecar:
        config = CoordinatorConfig.model_validate(
            {
                "models": ["tiny"],
                "endpoints": [
                    {"name": f"d{i}", "role": "decode", "address": a, "url": sidecar}
                    for i, a in enumerate(DECODES[:6])
                ],
                "scheduler": {"policy": "kv-aware", "params": {"log_breakdown_top_k": 2}},
            }
        )
        with serve(create_app(config)) as url:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            for level, rid in ((logging.INFO, "info"), (logging.DEBUG, "debug")):
                caplog.set_level(level, logger="pd_runtime.coordinator")
                answer = httpx.post(
                    f"{url}/v1/completions", json=body, headers={"x-request-id": rid}
                )
                assert answer.status_code == 200
    marker = "Got pod scores "
    records = {
        r["x-request-id"]: r
        for r in (
            json.loads(m.getMessage().split(marker, 1)[1])
            for m in caplog.records
            if marker in m.getMessage()
        )
    }
    assert all(m.levelno == logging.INFO for m in caplog.records if marker in m.getMessage())
    assert len(records["info"]["breakdown"]["total"]) in (2, 3)
    assert len(records["debug"]["breakdown"]["total"]) == 6


def test_queued_records_are_written_off_the_loop_and_none_are_lost_at_exit(
    tmp_path: Path,
) -> None:
    # A fresh process: the queued handler behind uvicorn's dictConfig, as the coordinator runs it;
    # the records written by another thread than the one logging; all of them there after exit.
    script = textwrap.dedent(
        """
        import logging, logging.config, sys, threading
        from pd_runtime.logging_setup import setup_logging, uvicorn_log_config

        class Where(logging.Filter):
            def filter(self, record):
                record.msg = f"{record.msg} [{threading.current_thread().name}]"
                return True

        setup_logging("info", queued=True)
        logging.config.dictConfig(uvicorn_log_config("info", queued=True))
        root = logging.getLogger()
        assert [type(h).__name__ for h in root.handlers] == ["QueueHandler"], root.handlers
        listener_target = __import__("pd_runtime.logging_setup").logging_setup._listener.handlers[0]
        listener_target.addFilter(Where())
        log = logging.getLogger("pd_runtime.coordinator")
        for i in range(5000):
            log.info("Got pod scores {\\"x-request-id\\": \\"%d\\"}", i)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    scores = [line for line in lines if "Got pod scores" in line]
    assert len(scores) == 5000
    assert scores[-1].endswith('{"x-request-id": "4999"} [Thread-1 (_monitor)]'), scores[-1]
    assert " INFO pd_runtime.coordinator: Got pod scores" in scores[0]
    assert scores[0].count("INFO") == 1  # formatted once, in the listener
    assert "ERROR pd_runtime.coordinator: failed" in done.stderr
    assert "ValueError: boom" in done.stderr


def test_the_breakdown_is_built_on_first_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built in ``schedule`` it was most of a 64-endpoint decision's time, for every request;
    now only a request whose line is logged builds it, once, with the scores of its decision."""
    from pd_runtime.scheduling import kv_aware

    calls: list[int | None] = []
    build = kv_aware._breakdown

    def counting(runs: Any, top_k: int | None) -> Any:
        calls.append(top_k)
        return build(runs, top_k)

    monkeypatch.setattr(kv_aware, "_breakdown", counting)
    s = scheduler(log_breakdown_top_k=2)
    hold(s, DECODES[5], 5)
    result = s.schedule(request())
    assert calls == []
    assert result.full_breakdown is not None
    whole = result.full_breakdown()  # as it stands right after the decision
    s.schedule(request("req-2"))  # a later decision books load: not seen by this breakdown
    first = result.breakdown
    assert calls == [None, 2]
    assert result.breakdown is first and calls == [None, 2]
    assert first is not None and DECODES[5] in first["total"]
    assert first == {k: {a: v for a, v in whole[k].items() if a in first["total"]} for k in whole}


def test_the_scores_are_built_on_first_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision's ``scores`` (the share of the prompt each holder holds, rounded: a decimal
    conversion per distinct share) are built by the line or the trace that reads them, once."""
    from pd_runtime.scheduling import kv_aware

    calls: list[int] = []
    build = kv_aware._prefix_scores

    def counting(cached: dict[str, int], blocks: int) -> Any:
        calls.append(blocks)
        return build(cached, blocks)

    monkeypatch.setattr(kv_aware, "_prefix_scores", counting)
    s = scheduler()
    hold(s, DECODES[5], 5)
    hold(s, DECODES[9], 2)
    result = s.schedule(request())
    assert calls == []
    s.schedule(request("req-2"))  # claims the prompt's blocks: not seen by the first decision
    assert result.scores == {DECODES[5]: 1.0, DECODES[9]: 0.4}
    assert result.scores is result.scores and calls == [5]
    assert '"scores":{"' in pod_scores_line("r", "m", result)
