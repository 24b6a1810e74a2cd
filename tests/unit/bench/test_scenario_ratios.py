"""The scenario comparison's per-repetition verdict: ours / vllm-router, and the fronts' order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pd_runtime.bench.scenarios import FRONTS, goodput_ratios, is_ours, ratio_table


def _row(front: str, workload: str, repetition: int, goodput: float | None, ttft: float) -> dict:
    return {
        "scenario": front,
        "workload": workload,
        "repetition": repetition,
        "goodput_rps": goodput,
        "ttft_p50_ms": ttft,
    }


def test_ratio_is_our_best_front_over_vllm_routers_best_per_repetition() -> None:
    rows: list[dict[str, Any]] = [
        _row("pd-kv-aware", "random", 0, 0.5, 900.0),
        _row("kv-aware", "random", 0, 1.2, 400.0),
        _row("direct", "random", 0, 9.0, 100.0),  # the no-front baseline is not "ours"
        _row("vllm-router", "random", 0, 1.0, 500.0),
        _row("vllm-router-pd", "random", 0, 0.6, 2000.0),
        _row("kv-aware", "random", 1, 0.9, 450.0),
        _row("vllm-router", "random", 1, 0.8, 300.0),
        _row("vllm-router-pd", "random", 1, 1.5, 2500.0),
        _row("kv-aware", "long-doc", 0, None, 0.0),  # failed cell: missing, not zero
        _row("vllm-router", "long-doc", 0, 1.0, 100.0),
        _row("kv-aware", "random@1rps", 0, 5.0, 1.0),  # the rate sweep is not a cell
    ]
    ratios = goodput_ratios(rows)
    assert [(r["repetition"], r["workload"]) for r in ratios] == [(0, "random"), (1, "random")]
    first, second = ratios
    assert first["ours_best"] == "kv-aware" and first["vllm_router_best"] == "vllm-router"
    assert first["goodput_ratio"] == 1.2
    assert first["ttft_p50_ratio_vs_cache_aware"] == 0.8  # 400 / 500
    assert second["vllm_router_best"] == "vllm-router-pd"
    assert second["goodput_ratio"] == 0.6  # 0.9 / 1.5
    assert second["ttft_p50_ratio_vs_cache_aware"] == 1.5  # 450 / 300
    table = ratio_table(ratios)
    assert "| random | 1.20, 0.60 | 0.60 | 1.20 | 1.50 |" in table


def test_ours_means_our_coordinator_fronts() -> None:
    assert {f for f in FRONTS if is_ours(f)} == {
        "pd-kv-aware",
        "pd-predicted",
        "pd-latency-led",
        "kv-aware",
        "round-robin",
    }
    assert not is_ours("pd-kv-aware (vllm bench serve)")


def test_every_front_of_ours_writes_a_coordinator_config_that_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pd-predicted's profiles and decider are valid scheduler params (checked as the
    coordinator would check them), and it differs from pd-kv-aware where it should."""
    import yaml

    from pd_runtime.bench.scenarios import DEFAULT_CONFIG, Context
    from pd_runtime.config import DeploymentConfig
    from pd_runtime.config.coordinator import CoordinatorConfig
    from pd_runtime.launcher.prepare import prepare_deployment
    from pd_runtime.scheduling.kv_aware import KVAwareParams

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    deployment = DeploymentConfig.model_validate(cfg["deployment"])
    plan = prepare_deployment(deployment, tmp_path, progress=lambda _: None, generate_model=False)
    params = {}
    for name in ("pd-kv-aware", "pd-predicted", "pd-latency-led"):
        FRONTS[name](Context(plan, tmp_path, 12000))
        written = yaml.safe_load((tmp_path / f"coordinator-{name}.yaml").read_text())
        config = CoordinatorConfig.model_validate(written)
        params[name] = KVAwareParams.model_validate(config.scheduler.params)
    assert params["pd-kv-aware"].pd_decider == "threshold"
    assert params["pd-predicted"].pd_decider == "predicted"
    scorers = [s.type for s in params["pd-predicted"].profiles["decode"].scorers]
    assert "predicted-latency" in scorers and "prefix-cache" in scorers
    led = {s.type: s.weight for s in params["pd-latency-led"].profiles["decode"].scorers}
    assert led == {"predicted-latency": 4, "prefix-cache": 1, "in-flight-load": 1}


def test_vllm_router_kv_subscribes_to_the_decode_workers_own_publishers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With vllm-router-kv in the run the workers bind their KV-event publishers (the router
    and our coordinator both connect), the router gets one source per decode worker and the
    engines' block size, and our fronts stay one process with the default profiles."""
    import yaml

    from pd_runtime.bench.scenarios import DEFAULT_CONFIG, Context, plan_workers
    from pd_runtime.config.coordinator import CoordinatorConfig

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    quiet = {"progress": lambda _: None, "generate_model": False}
    _, usual = plan_workers({**cfg, "fronts": ["pd-kv-aware", "vllm-router"]}, tmp_path, **quiet)
    assert all(e.kv_events_bind for e in usual.coordinator.endpoints)
    with pytest.raises(RuntimeError, match="does not bind"):
        FRONTS["vllm-router-kv"](Context(usual, tmp_path, 12000))

    _, plan = plan_workers({**cfg, "fronts": ["pd-kv-aware", "vllm-router-kv"]}, tmp_path, **quiet)
    assert not any(e.kv_events_bind for e in plan.coordinator.endpoints)
    argv = FRONTS["vllm-router-kv"](Context(plan, tmp_path, 12001)).argv
    assert argv is not None and argv[argv.index("--policy") + 1] == "kv_aware"
    sources = [argv[i + 1] for i, a in enumerate(argv) if a == "--kv-event-source"]
    decode = [e for e in plan.coordinator.endpoints if e.role == "decode"]
    assert [s.split("=", 1)[0] for s in sources] == [f"http://{e.address}" for e in decode]
    assert len(decode) == 2 and all(e.kv_events.startswith("ipc://") for e in decode)
    assert all(s.split("=", 1)[1].startswith("tcp://127.0.0.1:") for s in sources)  # forwarded
    assert argv[argv.index("--kv-event-block-size") + 1] == str(
        cfg["deployment"]["engine"]["block_size"]
    )
    model = Path(argv[argv.index("--kv-event-model") + 1])  # where its tokenizer.json is
    assert model == Path(plan.coordinator.scheduler.params["tokenizer"])
    for name in ("pd-kv-aware", "kv-aware"):
        FRONTS[name](Context(plan, tmp_path, 12000))
        written = yaml.safe_load((tmp_path / f"coordinator-{name}.yaml").read_text())
        config = CoordinatorConfig.model_validate(written)
        assert config.scheduler.params["replicas"] == 1 and not config.reuse_port  # one process
        assert not any(e.kv_events_bind for e in config.endpoints)  # it connects, too


def test_token_share_says_which_worker_computed_the_prompts() -> None:
    from pd_runtime.bench.scenarios import _token_share

    key = "vllm:prefix_cache_queries_total"
    per_worker = {"http://h:1": {key: 300.0}, "http://h:2": {key: 100.0}, "http://h:3": {key: 0.0}}
    names = {"http://h:1": "decode-0", "http://h:2": "decode-1", "http://h:3": "prefill-0"}
    share = _token_share(per_worker, names)
    assert share == {"decode-0": 0.75, "decode-1": 0.25, "prefill-0": 0.0}
    assert _token_share({"http://h:1": {key: 0.0}}, names) == {"decode-0": 0.0}


def test_front_cpu_counts_the_front_and_its_children(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A front whose child burns CPU: the child's seconds count (a front may be several
    processes); no process (``direct``): None."""
    import sys
    import time

    from pd_runtime.bench.scenarios import Front, Running

    burn = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
        "time.sleep(30)\n"
    )
    running = Running(Front("x", "http://127.0.0.1:1", [sys.executable, "-c", parent], ""),
                      tmp_path / "front.log")  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        seconds = 0.0
        while time.monotonic() < deadline:
            seconds = running.cpu_seconds() or 0.0
            if seconds >= 0.25:
                break
            time.sleep(0.05)
        assert seconds >= 0.25
    finally:
        running.stop()
    assert (
        Running(Front("direct", "http://127.0.0.1:1", None, ""), tmp_path / "d.log").cpu_seconds()
        is None
    )


def test_an_ipc_publisher_reaches_a_tcp_subscriber_through_the_forwarder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """vllm-router takes tcp:// sources only: a worker's ipc:// publisher is forwarded, the
    subscription passed upstream and multipart messages (topic, seq, payload) kept."""
    import time

    import zmq

    from pd_runtime.bench.scenarios import _tcp_events

    context = zmq.Context.instance()
    publisher = context.socket(zmq.PUB)
    endpoint = f"ipc://{tmp_path}/kv.sock"
    publisher.bind(endpoint)
    forwarded = _tcp_events(endpoint)
    assert forwarded.startswith("tcp://127.0.0.1:") and _tcp_events(endpoint) == forwarded
    assert _tcp_events("tcp://10.0.0.1:5557") == "tcp://10.0.0.1:5557"
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(forwarded)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the subscription has travelled upstream
            publisher.send_multipart([b"topic", b"\x00" * 8, b"payload"])
            if subscriber.poll(100):
                assert subscriber.recv_multipart() == [b"topic", b"\x00" * 8, b"payload"]
                return
        raise AssertionError("nothing arrived through the forwarder")
    finally:
        subscriber.close(0)
        publisher.close(0)


def _sweep_row(
    front: str, workload: str, rate: float, repetition: int, ttft: float, goodput: float
) -> dict:
    return {
        "scenario": front,
        "workload": f"{workload}@{rate:g}rps",
        "offered_rate": rate,
        "repetition": repetition,
        "ttft_p50_ms": ttft,
        "goodput_rps": goodput,
    }


def test_sweep_ratios_compare_fronts_at_the_same_offered_rate_per_repetition() -> None:
    from pd_runtime.bench.scenarios import sweep_ratio_table, sweep_ratios, sweep_workloads

    assert sweep_workloads({"workload": "random"}) == ["random"]
    assert sweep_workloads({"workloads": ["random", "long-doc"]}) == ["random", "long-doc"]
    sweep = [
        _sweep_row("pd-latency-led", "random", 1.0, 0, 120.0, 1.0),
        _sweep_row("kv-aware", "random", 1.0, 0, 90.0, 0.9),  # ours' best TTFT
        _sweep_row("vllm-router", "random", 1.0, 0, 100.0, 0.95),
        _sweep_row("vllm-router-kv", "random", 1.0, 0, 80.0, 0.5),  # not the TTFT reference
        _sweep_row("pd-latency-led", "random", 2.0, 0, 300.0, 1.8),
        _sweep_row("vllm-router", "random", 2.0, 0, 200.0, 1.2),
        _sweep_row("pd-latency-led", "random", 1.0, 1, 110.0, 1.0),
        _sweep_row("vllm-router", "random", 1.0, 1, 100.0, 1.0),
        _sweep_row("pd-latency-led", "long-doc", 1.0, 0, 50.0, 1.0),  # no vllm-router: no ratio
    ]
    ratios = sweep_ratios(sweep)
    assert [(r["repetition"], r["workload"], r["offered_rate"]) for r in ratios] == [
        (0, "random", 1.0),
        (0, "random", 2.0),
        (1, "random", 1.0),
    ]
    first = ratios[0]
    assert first["ours_best_ttft"] == "kv-aware"
    assert first["ttft_p50_ratio_vs_cache_aware"] == 0.9  # 90 / 100
    assert first["goodput_ratio"] == round(1.0 / 0.95, 3)  # best of ours / best of theirs
    assert ratios[1]["ttft_p50_ratio_vs_cache_aware"] == 1.5
    table = sweep_ratio_table(ratios)
    assert "| random | 1 | 0.90, 1.10 | 1.10 | 1.05, 1.00 |" in table
    assert "| random | 2 | 1.50 | 1.50 | 1.50 |" in table
