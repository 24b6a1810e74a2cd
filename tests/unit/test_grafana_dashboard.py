"""The Grafana dashboard under launch/kubernetes/grafana/: every metric its PromQL names is one the
code exports (the coordinator's and the sidecar's Prometheus registries) or one of vLLM's that the
scheduler reads, so a renamed metric fails here instead of leaving a panel empty."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from pd_runtime.coordinator.metrics import CoordinatorMetrics
from pd_runtime.scheduling.scraper import READ as VLLM_READ
from pd_runtime.sidecar.app import SidecarMetrics

DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "launch"
    / "kubernetes"
    / "grafana"
    / "pd-runtime-dashboard.json"
)
#: Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def exported(registry: CollectorRegistry) -> set[str]:
    """The series names a registry exposes (``_created`` left out: no panel should need it)."""
    return {
        f"{family.name}{suffix}"
        for family in registry.collect()
        for suffix in _SUFFIXES[family.type]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers left once strings, label matchers,
    ranges, grouping clauses, variables, function calls and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for token in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):  # not inside a number
        called = expr[token.end() :].lstrip().startswith("(")
        if not called and token.group().lower() not in _KEYWORDS:
            names.add(token.group())
    return names


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        'sum by (decode) (rate(pd_coordinator_decisions_total{job=~"$job"}[5m])) / ignoring(decode)'
        " group_left sum(rate(vllm:nixl_xfer_time_seconds_count[$__range])) > bool 0.5"
    )
    assert metric_names(expr) == {
        "pd_coordinator_decisions_total",
        "vllm:nixl_xfer_time_seconds_count",
    }


def test_every_metric_the_grafana_dashboard_queries_is_exported_or_read() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported(CoordinatorMetrics().registry) | exported(SidecarMetrics().registry)
    known |= set(VLLM_READ) | PROMETHEUS_OWN
    queried = targets(dashboard)
    assert len(queried) >= 20
    unknown = sorted(
        {
            (title, name)
            for title, expr in queried
            for name in metric_names(expr)
            if name not in known
        }
    )
    assert not unknown, f"panels query metrics nothing exports: {sorted(unknown)}"
    used = {name for _, expr in queried for name in metric_names(expr)}
    # The dashboard covers what the coordinator's /dashboard shows.
    for name in (
        "pd_coordinator_decisions_total",
        "pd_coordinator_requests_total",
        "pd_coordinator_prompt_tokens_total",
        "pd_coordinator_cached_prompt_tokens_total",
        "pd_coordinator_request_seconds_bucket",
        "pd_coordinator_in_flight",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
    ):
        assert name in used, name


def test_the_grafana_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"title", "uid", "panels", "templating", "schemaVersion"} <= set(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert [t["refId"] for t in panel["targets"]] == [
                chr(65 + i) for i in range(len(panel["targets"]))
            ]
