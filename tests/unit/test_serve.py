"""``pd-runtime serve MODEL``: flags -> the DeploymentConfig `up` would read (one default per
setting, vLLM's flags passed to every worker), --print-config's YAML planning the same deployment,
and a --help that reads like vLLM's."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from pd_runtime.cli import build_parser, main
from pd_runtime.config import DeploymentConfig, EngineConfig, TransportConfig
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.serve import serve_config
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.topology import plan_deployment
from pd_runtime.platform import Platform
from pd_runtime.registries import load_checked

CPU = Platform("cpu", 0, (0, 1))


def config(*argv: str) -> DeploymentConfig:
    """What ``pd-runtime serve ARGV`` would run (main's own split of ``--`` and unknown flags)."""
    words = list(argv)
    passthrough: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    args, unknown = build_parser().parse_known_args(["serve", *words])
    return serve_config(args, [*unknown, *passthrough])


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_defaults_come_from_the_typed_models() -> None:
    c = config("Qwen/Qwen3-0.6B")
    assert c.model.path == c.model.name == "Qwen/Qwen3-0.6B" and c.model.generate is None
    assert (c.prefill.replicas, c.decode.replicas) == (1, 1)
    assert c.engine == EngineConfig() and c.transport == TransportConfig()
    assert c.coordinator.port == CoordinatorConfig.model_fields["port"].default
    assert c.coordinator.scheduler.policy == "kv-aware"
    assert c.launcher.type == "local" and c.warm_up


def test_shape_ports_engine_and_transport_flags() -> None:
    c = config(
        "/models/m", "--prefill", "2", "--decode", "3", "--served-model-name", "m",
        "--generate", "tiny", "--port", "9000", "--prefill-port", "9100", "--decode-port", "9200",
        "--sidecar-port", "9300", "--side-channel-port", "9400", "--kv-events-port", "9500",
        "--kv-events-replay-port", "9600", "--tensor-parallel-size", "2", "--max-model-len",
        "4096", "--block-size", "64", "--no-enforce-eager", "--kv-lease", "20",
        "--platform", "cpu", "--scheduler", "round-robin", "--scheduler-param", "x=[1, 2]",
        "--coordinator-replicas", "2",
    )  # fmt: skip
    assert (c.model.path, c.model.name, c.model.generate) == ("/models/m", "m", "tiny")
    assert (c.prefill.replicas, c.decode.replicas, c.coordinator.port) == (2, 3, 9000)
    # The decode workers' NIXL and KV-event ports follow the prefill workers': never a collision.
    assert (c.prefill.port, c.prefill.side_channel_port, c.prefill.kv_events_port) == (
        9100, 9400, 9500)  # fmt: skip
    assert (c.decode.port, c.decode.side_channel_port, c.decode.kv_events_port) == (
        9200, 9402, 9502)  # fmt: skip
    assert (c.prefill.kv_events_replay_port, c.decode.kv_events_replay_port) == (9600, 9602)
    assert c.sidecar.port == 9300
    assert c.engine == EngineConfig(
        tensor_parallel_size=2, max_model_len=4096, block_size=64, enforce_eager=False
    )
    assert c.transport == TransportConfig(kv_lease_s=20, platform="cpu")
    assert c.coordinator.scheduler.policy == "round-robin"
    assert c.coordinator.scheduler.params == {"x": [1, 2]}
    assert (c.coordinator.replicas, c.coordinator.replica_ports) == (2, [9001, 9002])


def test_flags_it_does_not_know_go_to_every_workers_vllm_and_its_own_are_not_swallowed(
    tmp_path: Path,
) -> None:
    c = config(
        "m", "--max-num-seqs", "64", "--max-model-len", "1024", "--enable-chunked-prefill",
        "--port", "9000", "--kv-cache-dtype=fp8", "--", "--seed", "1", "--port", "5",
    )  # fmt: skip
    assert c.engine.extra_args == [
        "--max-num-seqs", "64", "--enable-chunked-prefill", "--kv-cache-dtype=fp8",
        "--seed", "1", "--port", "5",
    ]  # fmt: skip
    assert c.engine.max_model_len == 1024 and c.coordinator.port == 9000
    # No abbreviations: a vLLM flag that starts like one of ours stays vLLM's.
    assert config("m", "--max-model", "7").engine.extra_args == ["--max-model", "7"]
    plan = plan_deployment(c, tmp_path, CPU)
    for worker in plan.by_kind("worker"):
        i = worker.argv.index("--max-num-seqs")
        assert worker.argv[i : i + 2] == ["--max-num-seqs", "64"]
        assert "--kv-cache-dtype=fp8" in worker.argv
        assert worker.argv[worker.argv.index("--max-model-len") + 1] == "1024"


def test_mistakes_name_the_flag_or_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["serve", "m", "--scheduler", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["serve", "m", "--decode", "0"])
    assert "must be >= 1, not 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--scheduler-param: 'x' is not KEY=VALUE"):
        config("m", "--scheduler-param", "x")
    with pytest.raises(ConfigError, match=r"decode\.port: port 8100 collides with prefill\.port"):
        config("m", "--decode-port", "8100")
    # Only serve passes unknown flags on; every other command still refuses them.
    with pytest.raises(SystemExit):
        main(["status", "--max-num-seqs", "64"])
    assert "unrecognized arguments: --max-num-seqs 64" in capsys.readouterr().err


def test_print_config_writes_yaml_that_up_plans_identically(tmp_path: Path) -> None:
    argv = [
        "serve", str(tmp_path / "model"), "--generate", "tiny", "--prefill", "1", "--decode",
        "2", "--port", "9000", "--max-num-seqs", "8", "--scheduler-param",
        "pd_threshold_tokens=128", "--", "--seed", "3",
    ]  # fmt: skip
    # After `--` it would be vLLM's: --print-config goes before.
    code, yaml_text = run(*argv[:-3], "--print-config", *argv[-3:])
    assert code == 0 and yaml_text.startswith(
        "# `pd-runtime up --config FILE` runs what `pd-runtime serve "
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    loaded = load_checked(DeploymentConfig, path)
    flags = config(*argv[1:])
    assert loaded == flags
    run_dir = tmp_path / "run"
    assert plan_deployment(loaded, run_dir, CPU) == plan_deployment(flags, run_dir, CPU)
    assert not (tmp_path / "model").exists()  # --print-config starts and writes nothing


def test_help_reads_like_vllms() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    assert text.startswith("usage: pd-runtime serve MODEL [options] [-- VLLM_ARGS ...]\n")
    groups = [
        "deployment shape:", "ports (replica i of a group: base + i):",
        "engine (every worker's vLLM):", "transport (NIXL / UCX):", "scheduler:", "launch:",
    ]  # fmt: skip
    positions = [text.index(g) for g in groups]
    assert positions == sorted(positions)
    for flag, default in (
        ("--prefill N", "(default 1)"),
        ("--port N", "(default 8000)"),
        ("--max-model-len N", "(default 2048)"),
        ("--enforce-eager, --no-enforce-eager", "(default True)"),
        ("--scheduler {kv-aware,round-robin}", "(default kv-aware)"),
    ):
        after = " ".join(text[text.index(f"\n  {flag}") :].split()[:40])
        assert default in after, flag
    assert "--max-num-seqs 64" in text  # the pass-through, shown in the description
