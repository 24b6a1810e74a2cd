"""Writing results: per-run JSON, summary.json rows, a Markdown table, machine description."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pd_runtime.bench.machine import describe_machine
from pd_runtime.bench.runner import RunResult

__all__ = ["SUMMARY_KEYS", "machine_description", "markdown_table", "run_json", "write_json"]

#: The keys every summary.json row has (issue 5's schema), in table order.
SUMMARY_KEYS = (
    "scenario",
    "workload",
    "requests",
    "errors",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "itl_p99_ms",
    "tpot_p50_ms",
    "e2e_p50_ms",
    "throughput_rps",
    "output_tok_s",
    "goodput_rps",
    "prefix_hit_rate",
)


def run_json(result: RunResult, summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "summary": summary,
        "max_in_flight": result.max_in_flight,
        "schedule_s": [round(t, 6) for t in result.schedule],
        "records": [r.to_json() for r in result.records],
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_description() -> dict[str, Any]:
    return describe_machine(extra_versions=("httpx", "aiohttp"))
