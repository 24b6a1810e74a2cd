"""decision_log_per_s: the coordinator writes every decision line up to the rate, then one line per
window with the count of those it left out; retries are logged whatever the budget."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.coordinator.decision_log import DecisionLineBudget
from tests.servers import FakeEngine, free_port, serve

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
SKIPPED = re.compile(r"Got pod scores: (\d+) decision lines not logged")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def summaries(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(m[1]) for r in caplog.records if (m := SKIPPED.search(r.getMessage()))]


def test_the_first_per_s_of_each_window_pass_then_the_skipped_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="t")
    clock, counted = Clock(), []
    budget = DecisionLineBudget(3, logging.getLogger("t"), lambda: counted.append(1), clock)
    assert [budget.admit() for _ in range(5)] == [True, True, True, False, False]
    clock.now += 0.99  # the same window
    assert budget.admit() is False
    assert summaries(caplog) == [] and len(counted) == 3  # counted at once, summed per window
    clock.now += 0.02  # the window has passed: its 3 skipped are reported, a new 3 pass
    assert [budget.admit() for _ in range(4)] == [True, True, True, False]
    assert summaries(caplog) == [3] and len(counted) == 4
    budget.flush()  # shutdown reports the open window's
    assert summaries(caplog) == [3, 1]
    budget.flush()  # nothing new: nothing said
    assert summaries(caplog) == [3, 1]


def test_a_rate_below_one_widens_the_window_and_zero_means_every_line() -> None:
    clock = Clock()
    slow = DecisionLineBudget(0.25, logging.getLogger("t"), clock=clock)
    assert slow.window_s == 4.0
    assert [slow.admit(), slow.admit()] == [True, False]
    clock.now += 3.9
    assert slow.admit() is False
    clock.now += 0.2
    assert slow.admit() is True
    unlimited = DecisionLineBudget(0, logging.getLogger("t"), clock=clock)
    assert all(unlimited.admit() for _ in range(10_000))
    with pytest.raises(ValueError, match="decision_log_per_s"):
        DecisionLineBudget(-1, logging.getLogger("t"))


def test_the_coordinator_logs_up_to_the_budget_and_always_logs_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    good = FakeEngine("good")
    with serve(good.app()) as good_url:
        dead = f"http://127.0.0.1:{free_port()}"
        endpoints = [
            {"name": f"decode-{i}", "role": "decode", "address": f"127.0.0.1:{9200 + i}", "url": u}
            for i, u in enumerate([good_url, dead])
        ]
        # A window of 1,000 s (one line per 1,000 s): the test cannot cross into a second one.
        config = CoordinatorConfig.model_validate(
            {"models": ["tiny"], "endpoints": endpoints, "decision_log_per_s": 0.001}
        )
        with serve(create_app(config)) as url:
            statuses = [
                httpx.post(
                    f"{url}/v1/completions", json=BODY, headers={"x-request-id": f"r{i}"}
                ).status_code
                for i in range(6)
            ]
            metrics = httpx.get(f"{url}/metrics").text
    assert statuses == [200] * 6
    assert len(good.requests) == 6  # round-robin: r1-r5 went to the dead one first
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Got pod scores {")
    ]
    records = [json.loads(line.split("Got pod scores ", 1)[1]) for line in lines]
    # r0: the budget's one line; r1-r5: their first attempts (to the dead one) skipped, their
    # retries logged.
    assert [(r["x-request-id"], r["target"]) for r in records] == [
        (f"r{i}", "127.0.0.1:9200") for i in range(6)
    ]
    assert "pd_coordinator_decision_lines_skipped_total 5.0" in metrics
    assert summaries(caplog) == [5]  # the window closed at shutdown


def test_the_default_budget_logs_a_burst_below_it_whole(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    assert CoordinatorConfig.model_fields["decision_log_per_s"].default == 100.0
    fake = FakeEngine("sidecar")
    with serve(fake.app()) as sidecar:
        config = CoordinatorConfig.model_validate(
            {
                "models": ["tiny"],
                "endpoints": [
                    {"name": "d", "role": "decode", "address": "127.0.0.1:9200", "url": sidecar}
                ],
            }
        )
        with serve(create_app(config)) as url, httpx.Client() as client:
            for _ in range(20):
                assert client.post(f"{url}/v1/completions", json=BODY).status_code == 200
    assert sum(r.getMessage().startswith("Got pod scores {") for r in caplog.records) == 20
    assert summaries(caplog) == []
