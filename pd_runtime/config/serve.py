"""``pd-runtime serve MODEL``: a whole deployment from flags, vLLM-style, without a YAML file.

The flags are generated from the typed models (one default per setting) and build the
:class:`~pd_runtime.config.deployment.DeploymentConfig` that ``up --config`` would read::

    deployment shape   MODEL, --prefill N, --decode M, --served-model-name, --generate, --name, --host
    ports              ServeSettings: --port (gateway), per-group bases (replica i: base + i)
    engine             EngineConfig:    --tensor-parallel-size, --max-model-len, --block-size, ...
    transport          TransportConfig: --platform, --ucx-tls, --kv-lease, ...
    scheduler          --scheduler POLICY, --scheduler-param KEY=VALUE
    anything else      engine.extra_args: every worker's vLLM command line (``--max-num-seqs 64``,
                       and everything after ``--``)

Port layout: the prefill workers take ``base + i``, the decode workers follow them on the NIXL
and KV-event ports (``base + P + i``), so ``--prefill``/``--decode`` never make them collide;
the HTTP ports have a base per group (prefill 8100, decode 8200, sidecars 8300 by default).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pd_runtime.common.flags import add_flags, from_args
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.deployment import (
    DeploymentConfig,
    EngineConfig,
    ModelConfig,
    TransportConfig,
)
from pd_runtime.config.loader import parse_config
from pd_runtime.errors import ConfigError

__all__ = ["ENGINE_FLAGS", "ServeSettings", "add_serve_flags", "serve_config"]

#: EngineConfig's fields that are flags (``extra_args`` is what serve does not know).
ENGINE_FLAGS = tuple(name for name in EngineConfig.model_fields if name != "extra_args")
Port = Field(ge=1, le=65535)


class ServeSettings(BaseModel):
    """The shape of a ``serve`` deployment and where its parts listen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill: int = Field(default=1, ge=0, description="prefill workers")
    decode: int = Field(default=1, ge=1, description="decode workers (each with a sidecar)")
    coordinator_replicas: int = Field(
        default=1,
        ge=1,
        description="coordinator processes sharing the gateway's port (SO_REUSEPORT); replica k "
        "also listens alone on port + 1 + k",
    )
    port: int = Field(
        default=CoordinatorConfig.model_fields["port"].default,
        ge=1,
        le=65535,
        description="the gateway's port (the OpenAI API)",
    )
    prefill_port: int = Field(default=8100, ge=1, le=65535, description="prefill-i's vLLM port")
    decode_port: int = Field(default=8200, ge=1, le=65535, description="decode-i's vLLM port")
    sidecar_port: int = Field(default=8300, ge=1, le=65535, description="sidecar-i's port")
    side_channel_port: int = Field(
        default=5600, ge=1, le=65535, description="NIXL side channels (prefill, then decode)"
    )
    kv_events_port: int = Field(
        default=5700, ge=1, le=65535, description="KV-event sockets (prefill, then decode)"
    )
    kv_events_replay_port: int = Field(
        default=5800, ge=1, le=65535, description="KV-event replay sockets (prefill, then decode)"
    )
    scheduler: str = Field(
        default="kv-aware",
        description="the coordinator's scheduling policy (serve's default is the KV-aware one; a "
        "config file without a policy gets round-robin)",
    )


_SHAPE = ("prefill", "decode", "coordinator_replicas")
_PORTS = tuple(name for name in ServeSettings.model_fields if name.endswith("port"))


def add_serve_flags(
    parser: argparse.ArgumentParser, choices: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Every flag of ``serve``, in groups; ``choices``: {"scheduler": registered policies}."""
    parser.add_argument("model", metavar="MODEL", help="a model directory or a hub id")
    shape = parser.add_argument_group("deployment shape")
    add_flags(shape, ServeSettings, only=_SHAPE)
    shape.add_argument(
        "--served-model-name",
        help="the name clients ask for (default: MODEL)",
    )
    shape.add_argument(
        "--generate",
        choices=["tiny", "small"],
        help="write a local random Qwen3 model of this size at MODEL if it is missing (no "
        "downloads; for demos and tests) (default: none)",
    )
    shape.add_argument(
        "--name",
        default=DeploymentConfig.model_fields["name"].default,
        help="the deployment's name; logs go to runs/NAME (default %(default)s)",
    )
    shape.add_argument(
        "--host",
        default=DeploymentConfig.model_fields["host"].default,
        help="the address every part listens on (default %(default)s)",
    )
    add_flags(
        parser.add_argument_group("ports (replica i of a group: base + i)"),
        ServeSettings,
        only=_PORTS,
    )
    add_flags(
        parser.add_argument_group("engine (every worker's vLLM)"), EngineConfig, only=ENGINE_FLAGS
    )
    add_flags(parser.add_argument_group("transport (NIXL / UCX)"), TransportConfig)
    scheduler = parser.add_argument_group("scheduler")
    add_flags(scheduler, ServeSettings, only=("scheduler",), choices=choices)
    scheduler.add_argument(
        "--scheduler-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a scheduler parameter (repeat; the value is read as YAML), e.g. "
        "pd_threshold_tokens=128 (default: the policy's own)",
    )


def _scheduler_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--scheduler-param: {pair!r} is not KEY=VALUE")
        params[key] = yaml.safe_load(value)
    return params


def serve_config(args: argparse.Namespace, extra_args: Sequence[str] = ()) -> DeploymentConfig:
    """The deployment ``serve``'s flags describe; ``extra_args`` go to every worker's vLLM."""
    s = ServeSettings(**from_args(args, ServeSettings))
    shape = {"prefill": s.prefill, "decode": s.decode}

    def group(role: str, port: int, first: int) -> dict[str, Any]:
        return {
            "replicas": shape[role],
            "port": port,
            "side_channel_port": s.side_channel_port + first,
            "kv_events_port": s.kv_events_port + first,
            "kv_events_replay_port": s.kv_events_replay_port + first,
        }

    model: dict[str, Any] = {"path": args.model, "served_name": args.served_model_name}
    if args.generate:
        model["generate"] = args.generate
    data = {
        "name": args.name,
        "host": args.host,
        "model": ModelConfig(**model).model_dump(),
        "engine": {**from_args(args, EngineConfig, ENGINE_FLAGS), "extra_args": list(extra_args)},
        "transport": from_args(args, TransportConfig),
        "prefill": group("prefill", s.prefill_port, 0),
        "decode": group("decode", s.decode_port, s.prefill),
        "sidecar": {"port": s.sidecar_port},
        "coordinator": {
            "port": s.port,
            "replicas": s.coordinator_replicas,
            "scheduler": {
                "policy": s.scheduler,
                "params": _scheduler_params(args.scheduler_param),
            },
        },
    }
    return parse_config(DeploymentConfig, data, "the serve flags")
