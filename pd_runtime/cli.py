"""The ``pd-runtime`` command line: one subcommand per process kind, plus ``up`` and ``demo``.

pd-runtime model tiny DIR        write a local random Qwen3 model (no downloads)
pd-runtime worker ...            a vLLM server with P/D settings (prefill, decode or both)
pd-runtime sidecar ...           the proxy in front of one decode worker
pd-runtime coordinator ...       the OpenAI-compatible gateway and scheduler
pd-runtime up --config FILE      the whole deployment on this machine
pd-runtime serve MODEL [options] the same from flags, vLLM-style (--prefill N --decode M ...)
pd-runtime plan --config FILE    where each part would run (GPUs, cores, ports, UCX), starting nothing
pd-runtime demo                  bring it up, walk through what it does, shut down
pd-runtime status                each part of a running `up`: state, health, restarts
pd-runtime warmup ...            warm workers and check (prefill, decode) pairs (a startup probe)
pd-runtime bench ...             benchmark an OpenAI-compatible server (code in pd_runtime/bench/)
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pd_runtime.errors import PDRuntimeError

if TYPE_CHECKING:
    from pd_runtime.config import DeploymentConfig

__all__ = ["build_parser", "main"]

DEFAULT_CONFIG = "configs/local-cpu.yaml"


def _add_model(sub: argparse._SubParsersAction) -> None:
    from pd_runtime.model.tiny import MODEL_SIZES

    p = sub.add_parser("model", help="write a local model or LoRA adapter (no downloads)")
    p.add_argument(
        "kind",
        choices=["tiny", "lora"],
        help="'tiny': a seeded random Qwen3 model; 'lora': a seeded random LoRA adapter for it "
        "(peft's format; vLLM --lora-modules NAME=DIR)",
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _add_worker(sub: argparse._SubParsersAction) -> None:
    from pd_runtime.common.flags import add_flags
    from pd_runtime.worker.settings import FLAG_NAMES, WorkerSettings

    p = sub.add_parser(
        "worker",
        help="start vLLM's OpenAI server as a P/D worker",
        description="Start vLLM's OpenAI server with NIXL KV transfer, KV events and UCX transport "
        "set for its role. Arguments after '--' go to vLLM unchanged.",
    )
    # Generated from the worker's typed settings (one default each), under the names the
    # Kubernetes manifests use; WorkerSettings.to_spec turns them into the WorkerSpec.
    add_flags(p, WorkerSettings, names=FLAG_NAMES)
    p.add_argument("--dry-run", action="store_true", help="print the command and environment")


def _add_sidecar(sub: argparse._SubParsersAction) -> None:
    from pd_runtime.common.flags import add_flags
    from pd_runtime.config.discovery import DiscoveryConfig
    from pd_runtime.config.sidecar import SidecarTuning
    from pd_runtime.discovery.registry import DISCOVERY
    from pd_runtime.sidecar.connectors.base import CONNECTORS

    p = sub.add_parser("sidecar", help="start the P/D proxy in front of one decode worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--decode-url", required=True, help="the local decode worker, e.g. http://127.0.0.1:8200"
    )
    p.add_argument(
        "--prefiller",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a prefill endpoint this sidecar may forward to (repeat); no others are used",
    )
    p.add_argument(
        "--discover-prefillers",
        choices=[name for name in DISCOVERY.names() if name != "static"],
        help="also trust the ready prefill pods found by label in --namespace (kept current)",
    )
    p.add_argument("--namespace", help="with --discover-prefillers (default: the pod's own)")
    p.add_argument(
        "--selector",
        default=DiscoveryConfig.model_fields["label_selector"].default,
        help="with --discover-prefillers: the worker pods' label selector",
    )
    # The tuning flags come from the typed settings (one default each, shared with the
    # deployment's sidecar section); the launcher writes them with flags.to_argv.
    add_flags(p, SidecarTuning, choices={"connector": CONNECTORS.names()})
    p.add_argument("--log-level", default="info")


def _add_coordinator(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="start the OpenAI-compatible gateway and scheduler")
    p.add_argument(
        "--config",
        required=True,
        help="coordinator YAML (models + endpoints, or one pool per model; aliases; policy)",
    )
    p.add_argument("--host", help="override the config's host")
    p.add_argument("--port", type=int, help="override the config's port")
    p.add_argument(
        "--replica-port",
        type=int,
        help="as one of several replicas (config reuse_port: true): also listen here alone, for "
        "this replica's own /health and /metrics",
    )
    p.add_argument("--log-level", default="info")


def _add_up_and_demo(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a whole deployment on this machine and keep it running")
    demo = sub.add_parser("demo", help="bring the local deployment up, show what it does, stop")
    for p in (up, demo):
        p.add_argument(
            "--config",
            default=DEFAULT_CONFIG,
            help=f"deployment YAML (default {DEFAULT_CONFIG}; several models and LoRA adapters: "
            "configs/local-cpu-two-models.yaml)",
        )
        p.add_argument("--run-dir", default=None, help="where logs go (default runs/<name>)")
        p.add_argument(
            "--ray",
            metavar="ADDRESS",
            help="run on this Ray cluster ('auto', HOST:PORT of its head): one placement group per "
            "worker (sets the config's launcher to {type: ray, address: ADDRESS})",
        )


SERVE_DESCRIPTION = """\
Serve MODEL (a local directory or a hub id) with disaggregated prefill and decode: --prefill N
and --decode M vLLM workers, a sidecar in front of each decode worker, and the OpenAI-compatible
gateway on --port, placed, warmed and supervised exactly as `up` does (until Ctrl-C).

Flags pd-runtime does not know go to every worker's vLLM command line, as does everything after
`--` (vLLM-style: `pd-runtime serve MODEL --max-num-seqs 64`; give MODEL first, or write a vLLM
flag as --flag=VALUE). --print-config writes the same deployment as YAML, for `up --config`.
"""

SERVE_EPILOG = """\
examples:
  pd-runtime serve .cache/models/tiny --generate tiny --prefill 1 --decode 2
  pd-runtime serve Qwen/Qwen3-0.6B --tensor-parallel-size 2 --max-num-seqs 64 --port 8080
  pd-runtime serve Qwen/Qwen3-0.6B --decode 3 --print-config > my.yaml   # then: up --config my.yaml
"""


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from pd_runtime.config.serve import add_serve_flags
    from pd_runtime.scheduling.registry import SCHEDULERS

    p = sub.add_parser(
        "serve",
        help="serve MODEL from flags, vLLM-style: N prefill + M decode workers and the gateway",
        usage="pd-runtime serve MODEL [options] [-- VLLM_ARGS ...]",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a vLLM flag must not be taken for an abbreviation of ours
    )
    add_serve_flags(p, choices={"scheduler": SCHEDULERS.names()})
    launch = p.add_argument_group("launch")
    launch.add_argument(
        "--print-config",
        action="store_true",
        help="print the deployment as YAML (what `up --config` reads) and exit",
    )
    launch.add_argument("--run-dir", default=None, help="where logs go (default runs/NAME)")
    launch.add_argument(
        "--ray", metavar="ADDRESS", help="run on this Ray cluster, as `up --ray` (default: here)"
    )


def _add_status_and_warmup(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status",
        help="the parts of a running `up`: state (running, restarting, crash-looping), health, "
        "pid, restarts",
    )
    status.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"deployment YAML (default {DEFAULT_CONFIG})"
    )
    status.add_argument("--run-dir", default=None, help="as given to up (default runs/<name>)")
    status.add_argument("--json", action="store_true", help="print the status file as JSON")
    warm = sub.add_parser(
        "warmup",
        help="warm vLLM workers (one greedy request each) and check (prefill, decode) pairs "
        "(disaggregated output equals colocated, KV moved over NIXL); exit 1 on a failure. "
        "`up` runs it itself; in Kubernetes it is the decode pods' startup probe",
    )
    warm.add_argument("--model", required=True, help="served model name")
    warm.add_argument(
        "--worker", action="append", default=[], metavar="URL", help="a worker to warm directly"
    )
    warm.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="PREFILL_HOST:PORT,DECODE_HOST:PORT,SIDECAR_URL",
        help="a pair to check through the decode worker's sidecar",
    )
    warm.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    # Listed for --help only: main() hands everything after "bench" to the harness's own parser.
    p = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server, or run the scenario comparison",
        add_help=False,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="print where each part would run, without starting anything",
        description="Place the deployment on this machine (NVML + sysfs) or on a described one "
        "(--machine) and print each part: role, GPUs, NUMA node, cores, ports, UCX transport and "
        "the command line `up` would run.",
    )
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"deployment YAML (default {DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--machine", help="machine description (YAML/JSON) to plan for instead of this one"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument(
        "--describe-machine",
        action="store_true",
        help="print this machine's description (the --machine format) and exit",
    )
    p.add_argument("--run-dir", default=None, help="as for up (default runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-runtime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_model,
        _add_worker,
        _add_sidecar,
        _add_coordinator,
        _add_up_and_demo,
        _add_serve,
        _add_plan,
        _add_status_and_warmup,
    ):
        add(sub)
    _add_bench(sub)
    return parser


# -- commands ------------------------------------------------------------------------------------


def _run_bench(argv: list[str]) -> int:
    """The harness (``pd_runtime.bench``) is imported here, not at the top of this module, so the
    serving processes never load it."""
    from pd_runtime.bench.cli import main as bench_main

    return bench_main(argv)


def _run_model(args: argparse.Namespace) -> int:
    from pd_runtime.model.tiny import describe, write_model

    if args.kind == "lora":
        from pd_runtime.model.tiny_lora import write_lora

        print(f"LoRA adapter written to {write_lora(args.dir, args.size, seed=args.seed)}")
        return 0
    path = write_model(args.dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(f"model written to {path}: {describe(path)}")
    return 0


def _run_worker(args: argparse.Namespace, passthrough: list[str]) -> int:
    from pd_runtime.common.flags import from_args
    from pd_runtime.worker.command import build_worker_command
    from pd_runtime.worker.settings import WorkerSettings

    spec = WorkerSettings(**from_args(args, WorkerSettings)).to_spec(passthrough)
    argv, env = build_worker_command(spec)
    if args.dry_run:
        for key, value in sorted(env.items()):
            print(f"{key}={value}")
        print(shlex.join(argv))
        return 0
    os.execvpe(argv[0], argv, {**os.environ, **env})  # the worker process *is* vLLM


def _run_sidecar(args: argparse.Namespace) -> int:
    from pd_runtime.common.flags import from_args
    from pd_runtime.common.server import run_server
    from pd_runtime.config.discovery import DiscoveryConfig
    from pd_runtime.config.sidecar import SidecarTuning
    from pd_runtime.logging_setup import setup_logging, uvicorn_log_config
    from pd_runtime.sidecar.app import SidecarSettings, create_app

    setup_logging(args.log_level)
    settings = SidecarSettings(
        decode_url=args.decode_url,
        allowed_prefillers=frozenset(args.prefiller),
        prefiller_discovery=(
            DiscoveryConfig(
                type=args.discover_prefillers,
                namespace=args.namespace,
                label_selector=args.selector,
            )
            if args.discover_prefillers
            else None
        ),
        host=args.host,
        port=args.port,
        **from_args(args, SidecarTuning),
    )
    run_server(
        create_app(settings),
        host=args.host,
        port=args.port,
        drain_timeout_s=settings.drain_timeout_s,
        drain_delay_s=settings.drain_delay_s,
        header_timeout_s=settings.header_timeout_s,
        log_config=uvicorn_log_config(args.log_level),
    )
    return 0


def _run_coordinator(args: argparse.Namespace) -> int:
    from pd_runtime.common.server import run_server
    from pd_runtime.config import CoordinatorConfig
    from pd_runtime.coordinator.app import create_app
    from pd_runtime.logging_setup import setup_logging, stop_logging, uvicorn_log_config
    from pd_runtime.registries import load_checked

    # Queued: the decision line and every other record are written by a listener thread, not
    # on the event loop; stop_logging writes what is left when the server has stopped.
    setup_logging(args.log_level, queued=True)
    try:
        config = load_checked(CoordinatorConfig, args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        config = config.model_copy(update=overrides)
        run_server(
            create_app(config),
            host=config.host,
            port=config.port,
            drain_timeout_s=config.drain_timeout_s,
            drain_delay_s=config.drain_delay_s,
            header_timeout_s=config.header_timeout_s,
            reuse_port=config.reuse_port,
            own_port=args.replica_port,
            log_config=uvicorn_log_config(args.log_level, queued=True),
        )
    finally:
        stop_logging()
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from pd_runtime.config import DeploymentConfig
    from pd_runtime.launcher.prepare import prepare_deployment
    from pd_runtime.launcher.render import render_json, render_table
    from pd_runtime.placement import discover_machine, load_machine
    from pd_runtime.registries import load_checked

    if args.describe_machine:
        print(discover_machine().to_yaml(), end="")
        return 0
    config = load_checked(DeploymentConfig, args.config)
    machine = load_machine(args.machine) if args.machine else None
    run_dir = Path(args.run_dir or f"runs/{config.name}")
    plan = prepare_deployment(config, run_dir, machine=machine, generate_model=False)
    print(render_json(plan) if args.format == "json" else render_table(plan))
    return 0


def _run_status(args: argparse.Namespace) -> int:
    import json
    import time

    from pd_runtime.config import DeploymentConfig, load_config
    from pd_runtime.launcher.status import STATUS_FILE, render_status

    if args.run_dir is None:
        args.run_dir = f"runs/{load_config(DeploymentConfig, args.config).name}"
    path = Path(args.run_dir) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"pd-runtime: no status in {path}: is `up` running with --run-dir {args.run_dir}?")
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    table, healthy = render_status(status, time.time())
    print(table)
    return 0 if healthy else 1


def _run_warmup(args: argparse.Namespace) -> int:
    from pd_runtime.launcher.warmup import WarmupError, probe_targets, warm_up

    endpoints, pairs = probe_targets(args.worker, args.pair)
    progress = lambda m: print(f"[warmup] {m}", flush=True)  # noqa: E731
    try:
        warm_up(endpoints, args.model, pairs=False, timeout_s=args.timeout, progress=progress)
        for prefill, decode in pairs:
            warm_up([prefill, decode], args.model, timeout_s=args.timeout, progress=progress)
    except WarmupError as exc:
        print(f"[warmup] FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both mean "stop everything cleanly"; set explicitly because a process
    started in the background by a shell inherits SIGINT as ignored."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _run_up(args: argparse.Namespace, demo: bool) -> int:
    from pd_runtime.config import DeploymentConfig
    from pd_runtime.registries import load_checked

    return _launch(load_checked(DeploymentConfig, args.config), args, demo)


def _run_serve(args: argparse.Namespace, engine_args: list[str], argv: list[str]) -> int:
    from pd_runtime.config.serve import serve_config
    from pd_runtime.registries import check_names

    config = check_names(serve_config(args, engine_args), "the serve flags")
    if args.print_config:
        import yaml

        print(f"# `pd-runtime up --config FILE` runs what `pd-runtime {shlex.join(argv)}` runs")
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    return _launch(config, args, demo=False)


def _launch(config: DeploymentConfig, args: argparse.Namespace, demo: bool) -> int:
    """What ``up``, ``demo`` and ``serve`` run: the launcher, until Ctrl-C or a crash loop."""
    from pd_runtime.config.launcher import RayLauncherConfig
    from pd_runtime.launcher.base import create_launcher
    from pd_runtime.logging_setup import setup_logging

    setup_logging("WARNING")
    if getattr(args, "ray", None):
        ray = config.launcher if isinstance(config.launcher, RayLauncherConfig) else None
        ray = (ray or RayLauncherConfig()).model_copy(update={"address": args.ray})
        config = config.model_copy(update={"launcher": ray})
    run_dir = Path(args.run_dir or f"runs/{config.name}")
    tag = "serve" if args.command == "serve" else "up"
    launcher = create_launcher(
        config, run_dir, progress=lambda m: print(f"[{tag}] {m}", flush=True)
    )
    _stop_on_signals()
    try:
        launcher.start()
        plan = launcher.plan  # as placed: on Ray, the hosts are the nodes the parts landed on
        for part in plan.parts:
            print(f"{part.name}: {part.url}")
        print(f"gateway: {plan.gateway_url}", flush=True)
        if demo:
            from pd_runtime.demo import run_demo

            return run_demo(plan, run_dir)
        print(launcher.wait_for_failure(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n[{tag}] stopping...", flush=True)
        return 0
    finally:
        # A second Ctrl-C (or a SIGTERM forwarded by a supervisor) must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
        print(f"[{tag}] all parts stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = list(argv)
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    # Only serve takes flags it does not know (they are vLLM's, for every worker).
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "model":
            return _run_model(args)
        if args.command == "worker":
            return _run_worker(args, passthrough)
        if args.command == "sidecar":
            return _run_sidecar(args)
        if args.command == "coordinator":
            return _run_coordinator(args)
        if args.command == "serve":
            return _run_serve(args, [*unknown, *passthrough], command)
        if args.command == "plan":
            return _run_plan(args)
        if args.command == "status":
            return _run_status(args)
        if args.command == "warmup":
            return _run_warmup(args)
        return _run_up(args, demo=args.command == "demo")
    except PDRuntimeError as exc:
        print(f"pd-runtime: error: {exc}", file=sys.stderr)
        return 2
