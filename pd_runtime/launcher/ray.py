"""Run a deployment plan on a Ray cluster: one placement group per worker, a supervisor actor per part.

    placement group "<name>/prefill-0"  STRICT_PACK  [ {GPU: tp, CPU: 1} ]            -> node X
    placement group "<name>/decode-0"   STRICT_PACK  [ {GPU: tp, CPU: 1}, {CPU: 0.5} ] -> node Y
                                                       decode-0 actor     sidecar-0 actor
    coordinator actor(s): pinned to the driver's node (where ``pd-runtime up --ray`` runs); with
    ``coordinator.replicas: N``, N actors share its port (SO_REUSEPORT)

* A TP group is one bundle ``{GPU: tp}``, so STRICT_PACK keeps it on one node and Ray assigns the
  actor (and through it vLLM) those ``tp`` GPUs (``CUDA_VISIBLE_DEVICES``). On a CPU cluster the
  bundle is ``{CPU: worker_cpus}``. ``resources`` adds custom resources per role (a node label
  like ``{node_a: 1}``, or ``accelerator_type:H200``).
* A sidecar is the second bundle of its decode worker's group: same node, by construction.
* Where the groups landed decides the hosts: each part binds its node's IP, workers publish KV
  events to the coordinator's node (with replicas, each worker binds ``tcp://*:PORT`` on its own
  node and every replica connects), and the coordinator's endpoint list (and each sidecar's
  trusted prefillers) are written from those IPs (:func:`relocate_plan`), not from static config.
* Each part runs under a :class:`~pd_runtime.launcher.supervisor.PartSupervisor` actor, which
  restarts the process when it dies; past ``process_restarts`` the actor exits and Ray restarts it
  in the same bundle (``max_restarts``). The coordinator takes a restarted worker back on its next
  good scrape, as with the local launcher.
* ``stop()`` stops every process (SIGTERM, then SIGKILL), kills the actors and removes the groups.
  Actors and groups belong to the driver's job, so a driver killed outright still takes them with
  it; the supervised processes get SIGTERM from the kernel when their actor dies.

Not handled: a lost node. Ray reschedules its groups elsewhere and the actors restart there with
new IPs, which the coordinator's static endpoint list does not follow; the launcher reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.deployment import DeploymentConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.config.launcher import RayLauncherConfig
from pd_runtime.config.loader import dump_yaml
from pd_runtime.errors import ConfigError, LaunchError
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.status import status_row, write_status_file
from pd_runtime.launcher.supervisor import PartStatus, PartSupervisor
from pd_runtime.launcher.topology import DeploymentPlan, PartKind, PartSpec
from pd_runtime.launcher.warmup import warm_up
from pd_runtime.placement.machine import MachineDescription
from pd_runtime.platform import Platform, detect_platform
from pd_runtime.worker.command import WorkerSpec, build_worker_command

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

__all__ = [
    "GroupSpec",
    "PartLocation",
    "RayLauncher",
    "RayPartSupervisor",
    "placement_groups",
    "relocate_plan",
]

Bundle = dict[str, float]


@dataclass(frozen=True)
class GroupSpec:
    """One placement group: a worker and the parts that must share its node, one bundle each."""

    name: str
    worker: str
    members: tuple[str, ...]  # part names; members[i] runs in bundles[i]
    bundles: tuple[Bundle, ...]
    strategy: str = "STRICT_PACK"

    def bundle_of(self, part: str) -> int:
        return self.members.index(part)


@dataclass(frozen=True)
class PartLocation:
    part: str
    group: str | None  # placement group name; None for the coordinator
    bundle: int | None
    node_id: str
    node_ip: str


def _sidecar_of(decode_name: str) -> str:
    # The plan puts sidecar-i in front of decode-i (see pd_runtime.config.deployment).
    return "sidecar-" + decode_name.removeprefix("decode-")


def placement_groups(
    plan: DeploymentPlan, settings: RayLauncherConfig, prefix: str = "pd"
) -> list[GroupSpec]:
    """One STRICT_PACK group per worker: ``{GPU: tp}`` (GPU) or ``{CPU: worker_cpus}`` (CPU) plus the
    role's custom resources; a decode worker's group also holds its sidecar's bundle."""
    workers = plan.by_kind("worker")
    if len(workers) != len(plan.workers):
        raise ConfigError("plan: worker parts and worker specs disagree")
    sidecars = {p.name for p in plan.by_kind("sidecar")}
    groups: list[GroupSpec] = []
    for part, spec in zip(workers, plan.workers, strict=True):
        bundle: Bundle = {"CPU": settings.worker_cpus}
        if spec.platform == "cuda":
            bundle["GPU"] = float(spec.tensor_parallel_size)
        for role, extra in settings.resources.items():
            if role == spec.role:
                bundle.update(extra)
        members, bundles = [part.name], [bundle]
        if spec.role == "decode":
            sidecar = _sidecar_of(part.name)
            if sidecar not in sidecars:
                raise ConfigError(f"plan: decode worker {part.name} has no {sidecar}")
            members.append(sidecar)
            bundles.append({"CPU": settings.sidecar_cpus})
        groups.append(GroupSpec(f"{prefix}/{part.name}", part.name, tuple(members), tuple(bundles)))
    return groups


def relocate_plan(
    plan: DeploymentPlan, hosts: dict[str, str], coordinator_host: str
) -> DeploymentPlan:
    """The same plan with every part on the host it was placed on.

    ``hosts``: part name -> IP for workers and sidecars. Worker command lines are rebuilt from
    their specs (bind address, NIXL side channel and KV-event topic on the worker's own IP; KV
    events sent to the coordinator's); sidecar arguments and the coordinator's endpoints are
    rewritten through the old -> new ``HOST:PORT`` of each part. Workers placed on more than one
    host get NIXL's own UCX error handling back where the config asked for ``none`` (one host
    only: without it a dead peer across the network hangs a transfer instead of failing it).
    """
    moved: dict[str, str] = {}  # old HOST:PORT -> new HOST:PORT
    parts: list[PartSpec] = []
    workers: list[WorkerSpec] = []
    worker_parts = plan.by_kind("worker")
    one_host = len({hosts[p.name] for p in worker_parts}) <= 1
    by_port = {spec.port: spec for spec in plan.workers}
    for part in plan.parts:
        host = coordinator_host if part.kind == "coordinator" else hosts[part.name]
        moved[f"{part.host}:{part.port}"] = f"{host}:{part.port}"
    for part in plan.parts:
        if part.kind == "worker":
            spec = by_port[part.port]
            if spec.kv_events_endpoint is None:  # the coordinator binds: events go to its node
                spec = dataclasses.replace(
                    spec, host=hosts[part.name], kv_events_host=coordinator_host
                )
            else:  # replicated coordinators connect: bind on the worker's node, not a local path
                spec = dataclasses.replace(
                    spec, host=hosts[part.name], kv_events_host="*", kv_events_endpoint=None
                )
            if not one_host and spec.ucx_error_handling == "none":
                spec = dataclasses.replace(spec, ucx_error_handling=None)
            argv, env = build_worker_command(spec)
            workers.append(spec)
            parts.append(dataclasses.replace(part, argv=argv, env=env, host=spec.host))
        elif part.kind == "sidecar":
            argv = [_moved_arg(arg, moved) for arg in part.argv]
            if "--host" in argv:
                argv[argv.index("--host") + 1] = hosts[part.name]
            parts.append(dataclasses.replace(part, argv=argv, host=hosts[part.name]))
        else:
            parts.append(dataclasses.replace(part, host=coordinator_host))
    replay_hosts = {f"{p.host}:{p.port}": hosts[p.name] for p in worker_parts}
    kv_events_ports = {f"{s.host}:{s.port}": s.kv_events_port for s in plan.workers}
    endpoints = [
        _moved_endpoint(e, moved, replay_hosts, kv_events_ports, coordinator_host)
        for e in plan.coordinator.endpoints
    ]
    coordinator = plan.coordinator.model_copy(
        update={"host": coordinator_host, "endpoints": endpoints}
    )
    return dataclasses.replace(plan, parts=parts, coordinator=coordinator, workers=workers)


def _moved_arg(arg: str, moved: dict[str, str]) -> str:
    for scheme in ("", "http://"):
        if arg.startswith(scheme) and arg[len(scheme) :] in moved:
            return scheme + moved[arg[len(scheme) :]]
    return arg


def _moved_endpoint(
    endpoint: EndpointConfig,
    moved: dict[str, str],
    replay_hosts: dict[str, str],
    kv_events_ports: dict[str, int | None],
    coordinator_host: str,
) -> EndpointConfig:
    url_address = endpoint.url.removeprefix("http://")
    update: dict[str, Any] = {
        "address": moved[endpoint.address],
        "url": f"http://{moved.get(url_address, url_address)}",
    }
    if endpoint.kv_events and endpoint.kv_events_bind:  # the coordinator binds it: its node
        update["kv_events"] = f"tcp://{coordinator_host}:{endpoint.kv_events.rsplit(':', 1)[1]}"
    elif endpoint.kv_events:  # the worker binds tcp://*:PORT (see relocate_plan)
        worker_port = kv_events_ports[endpoint.address]
        update["kv_events"] = f"tcp://{replay_hosts[endpoint.address]}:{worker_port}"
    if endpoint.kv_events_replay:  # the worker binds it: the worker's node
        port = endpoint.kv_events_replay.rsplit(":", 1)[1]
        update["kv_events_replay"] = f"tcp://{replay_hosts[endpoint.address]}:{port}"
    return endpoint.model_copy(update=update)


class RayPartSupervisor(PartSupervisor):
    """The supervisor as a Ray actor: it can also say which node it really runs on."""

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())


class RayLauncher:
    """``pd-runtime up`` on a Ray cluster (see the module docstring)."""

    def __init__(
        self,
        config: DeploymentConfig,
        run_dir: Path,
        progress: Callable[[str], None] = lambda _: None,
        *,
        poll_s: float = 1.0,
    ) -> None:
        if not isinstance(config.launcher, RayLauncherConfig):
            raise ConfigError("launcher.type: the Ray launcher needs `launcher: {type: ray}`")
        if config.pools or config.model.adapters:
            raise ConfigError("pools, model.adapters: the Ray launcher serves one model (for now)")
        self.config = config
        self.settings: RayLauncherConfig = config.launcher
        self.run_dir = Path(run_dir).resolve()
        self.progress = progress
        self.poll_s = poll_s
        self._plan: DeploymentPlan | None = None
        self.groups: list[GroupSpec] = []
        self.locations: dict[str, PartLocation] = {}
        self._pgs: list[PlacementGroup] = []
        self._actors: dict[str, Any] = {}  # part name -> actor handle, in start order
        self._seen_pids: dict[str, int | None] = {}
        self._owns_ray = False

    @property
    def plan(self) -> DeploymentPlan:
        """The plan as placed: made for the cluster's platform, with the nodes' IPs as hosts."""
        if self._plan is None:
            raise LaunchError("the Ray launcher has no plan before start()")
        return self._plan

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            # ray.init makes SIGTERM sys.exit() the driver; keep the caller's handler (``up``
            # turns SIGTERM into a clean stop).
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(
                address=self.settings.address,
                namespace=self.settings.namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            self._owns_ray = True
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        try:
            # Planned for the cluster (GPUs anywhere in it), not for the driver's machine, which
            # may well be a head node without GPUs; the model is written here if asked.
            machine = MachineDescription.from_platform(self._cluster_platform())
            self._plan = prepare_deployment(self.config, self.run_dir, self.progress, machine)
            self._place()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.plan.coordinator, self.plan.coordinator_config_path)  # a local copy
            stages: tuple[PartKind, ...] = ("worker", "sidecar", "coordinator")
            for kind in stages:
                specs = self.plan.by_kind(kind)
                if kind == "worker" and not self.config.parallel_startup:
                    for spec in specs:  # one NIXL agent initialising at a time
                        self._wait_healthy([self._start_part(spec)])
                else:
                    self._wait_healthy([self._start_part(spec) for spec in specs])
                if kind == "sidecar" and self.config.warm_up:
                    # The same checks as the local launcher, from the driver over the nodes'
                    # addresses: every worker warmed, every pair's transfer proven.
                    warm_up(
                        self.plan.coordinator.endpoints,
                        self.plan.coordinator.models[0],
                        progress=self.progress,
                    )
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop every process (front door first), kill the actors, remove the groups."""
        import ray

        if not ray.is_initialized():
            return
        actors = list(reversed(self._actors.items()))
        pending = {name: actor.stop.remote(grace_s) for name, actor in actors}
        for name, ref in pending.items():
            try:
                ray.get(ref, timeout=grace_s + 15)
            except Exception as exc:  # dead or unreachable actor: ray.kill below still applies
                self.progress(f"{name}: stop failed ({type(exc).__name__}); killing its actor")
        for _, actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors.clear()
        from ray.util.placement_group import remove_placement_group

        for pg in self._pgs:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self._pgs.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self, name: str, timeout_s: float = 30.0) -> PartStatus:
        import ray

        status: PartStatus = ray.get(self._actors[name].status.remote(), timeout=timeout_s)
        return status

    def node_of(self, name: str, timeout_s: float = 30.0) -> str:
        """The Ray node id the part's actor runs on, as the actor itself reports it."""
        import ray

        return str(ray.get(self._actors[name].node_id.remote(), timeout=timeout_s))

    def wait_for_failure(self, unavailable_for_s: float = 120.0) -> str:
        """Watch the supervisors; report restarts; return once a part is gone for good (its actor
        dead past its restarts, or unreachable for ``unavailable_for_s``)."""
        import ray

        down_since: dict[str, float] = {}
        moved: set[str] = set()
        statuses: dict[str, PartStatus] = {}  # the last each actor told, for status.json
        polls = 0
        while True:
            polls += 1
            if polls % 30 == 0:
                self._report_moves(moved)
            for name, actor in list(self._actors.items()):
                try:
                    status: PartStatus = ray.get(actor.status.remote(), timeout=30)
                except ray.exceptions.RayActorError as exc:
                    if isinstance(exc, ray.exceptions.ActorDiedError) and not _restarting(exc):
                        return f"{name}: its supervisor actor died for good: {exc}"
                    since = down_since.setdefault(name, time.monotonic())
                    if time.monotonic() - since > unavailable_for_s:
                        return f"{name}: its supervisor actor is unreachable: {exc}"
                    continue
                except ray.exceptions.GetTimeoutError:
                    continue
                down_since.pop(name, None)
                self._report_restart(name, status)
                statuses[name] = status
            specs = {p.name: p for p in self.plan.parts}
            rows = [
                status_row(specs[name], status, healthy=status.alive)
                for name, status in statuses.items()
            ]
            write_status_file(self.run_dir, self.plan.gateway_url, self.config.restarts, rows)
            time.sleep(self.poll_s)

    # -- placement -------------------------------------------------------------------------------

    def _cluster_platform(self) -> Platform:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        wanted = self.config.transport.platform
        name = ("cuda" if gpus else "cpu") if wanted == "auto" else wanted
        if name == "cuda" and not gpus:
            raise ConfigError("transport.platform: cuda, but the Ray cluster has no GPU")
        return Platform(name, gpus, detect_platform().cpu_cores)

    def _place(self) -> None:
        """Create every group, wait until the cluster fits them all, then relocate the plan."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        self.groups = placement_groups(self.plan, self.settings, prefix=self.config.name)
        for group in self.groups:
            self._pgs.append(
                placement_group(list(group.bundles), strategy=group.strategy, name=group.name)
            )
        try:
            ray.get([pg.ready() for pg in self._pgs], timeout=self.settings.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            wanted = "; ".join(f"{g.name}: {list(g.bundles)}" for g in self.groups)
            raise LaunchError(
                f"the Ray cluster could not fit the placement groups within "
                f"{self.settings.placement_timeout_s:.0f}s (wanted {wanted}; available "
                f"{ray.available_resources()})"
            ) from None
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        hosts: dict[str, str] = {}
        for group, pg in zip(self.groups, self._pgs, strict=True):
            nodes = placement_group_table(pg)["bundles_to_node_id"]
            for i, member in enumerate(group.members):
                node = nodes[i]
                hosts[member] = ips[node]
                self.locations[member] = PartLocation(member, group.name, i, node, ips[node])
        here = ray.get_runtime_context().get_node_id()
        for part in self.plan.by_kind("coordinator"):  # every replica on the driver's node
            self.locations[part.name] = PartLocation(part.name, None, None, here, ips[here])
        asked_none = any(w.ucx_error_handling == "none" for w in self.plan.workers)
        self._plan = relocate_plan(self.plan, hosts, ips[here])
        if asked_none and all(w.ucx_error_handling is None for w in self._plan.workers):
            self.progress(
                "workers span several nodes: UCX error handling 'none' (one host only: the "
                "config's, or the default where it says nothing) replaced by NIXL's peer"
            )
        for name, where in self.locations.items():
            self.progress(f"placed {name} on node {where.node_ip} ({where.node_id[:8]})")

    def _actor_options(self, spec: PartSpec) -> dict[str, Any]:
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )

        where = self.locations[spec.name]
        options: dict[str, Any] = {
            "name": f"{self.config.name}/{spec.name}",
            "max_restarts": self.settings.max_restarts,
            "max_concurrency": 4,  # status() answers while stop() waits
        }
        if where.group is None:  # the coordinator: on the driver's node, no reserved resources
            options["num_cpus"] = 0
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                where.node_id, soft=False
            )
            return options
        group = next(g for g in self.groups if g.name == where.group)
        bundle = group.bundles[where.bundle or 0]
        options["num_cpus"] = bundle.get("CPU", 0)
        options["num_gpus"] = bundle.get("GPU", 0)
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        if custom:
            options["resources"] = custom
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self._pgs[self.groups.index(group)], placement_group_bundle_index=where.bundle or 0
        )
        return options

    def _start_part(self, spec: PartSpec) -> str:
        import ray

        files = {}
        if spec.kind == "coordinator":
            files[str(self.plan.coordinator_config_path)] = _yaml(self.plan.coordinator)
        actor = (
            ray.remote(RayPartSupervisor)
            .options(**self._actor_options(spec))
            .remote(
                spec.name,
                spec.argv,
                # GPUs come from Ray's assignment to this actor (which sets CUDA_VISIBLE_DEVICES
                # in it), not from GPU indices planned for another machine.
                {k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES"},
                str(self.run_dir / f"{spec.name}.log"),
                files=files,
                cwd=os.getcwd(),
                niceness=0,  # not Ray's worker niceness (15): vLLM must not yield to everything
                max_process_restarts=self.settings.process_restarts,
                crash_loop_window_s=self.config.restarts.window_s,
                backoff_s=self.config.restarts.backoff_s,
                max_backoff_s=self.config.restarts.max_backoff_s,
            )
        )
        self._actors[spec.name] = actor
        where = self.locations[spec.name]
        self.progress(f"started {spec.name} on {where.node_ip} ({spec.placement or spec.kind})")
        return spec.name

    def _wait_healthy(self, names: list[str]) -> None:
        import ray

        specs = {p.name: p for p in self.plan.parts}
        pending = set(names)
        started = time.monotonic()
        deadline = started + self.config.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name in sorted(pending):
                    try:
                        status = self.status(name)
                    except ray.exceptions.RayActorError as exc:
                        raise LaunchError(f"{name}: its actor died during start-up: {exc}") from exc
                    if status.last_exit is not None:
                        tail = ray.get(self._actors[name].tail.remote())
                        raise LaunchError(
                            f"{name} exited with code {status.last_exit} during start-up; last "
                            f"lines of {status.log_path}:\n{tail}"
                        )
                    self._seen_pids[name] = status.pid
                    try:
                        healthy = client.get(f"{specs[name].url}/health").status_code == 200
                    except httpx.HTTPError:
                        healthy = False
                    if healthy:
                        pending.discard(name)
                        self.progress(f"{name} healthy after {time.monotonic() - started:.0f}s")
                if pending and time.monotonic() > deadline:
                    tails = "".join(
                        f"\nlast lines of {name}'s log:\n{ray.get(self._actors[name].tail.remote())}"
                        for name in sorted(pending)
                    )
                    raise LaunchError(
                        f"{', '.join(sorted(pending))} not healthy after "
                        f"{self.config.startup_timeout_s:.0f}s{tails}"
                    )
                if pending:
                    time.sleep(0.5)

    def _report_moves(self, moved: set[str]) -> None:
        """A restarted actor on another node (its node was lost and Ray re-placed the group) has a
        new IP that the coordinator's endpoints and the sidecars' prefillers do not follow."""
        for name, where in self.locations.items():
            if name in moved or name not in self._actors:
                continue
            with contextlib.suppress(Exception):
                node = self.node_of(name, timeout_s=10)
                if node != where.node_id:
                    moved.add(name)
                    self.progress(
                        f"WARNING {name} now runs on node {node[:8]}, not {where.node_id[:8]} "
                        "(node lost?); its address in the coordinator is stale: restart `up`"
                    )

    def _report_restart(self, name: str, status: PartStatus) -> None:
        before = self._seen_pids.get(name)
        if status.pid is not None and status.pid != before:
            self.progress(f"{name} restarted (pid {before} -> {status.pid}, {status.restarts})")
            self._seen_pids[name] = status.pid


def _restarting(exc: Exception) -> bool:
    return "restart" in str(exc).lower() and "will not be restarted" not in str(exc).lower()


def _yaml(config: CoordinatorConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
