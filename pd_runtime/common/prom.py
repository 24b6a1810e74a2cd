"""Read a worker's Prometheus metrics (vLLM's ``/metrics``) into plain numbers."""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["parse_metrics", "scrape_metrics", "select_samples"]


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name → value summed over label sets (e.g. over vLLM's ``model_name`` label)."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


@functools.lru_cache(maxsize=16)
def _sample_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    # Led by a literal newline, so the regex engine scans for it at C speed (a MULTILINE ``^``
    # would try every position); the name must end there (``{`` or blank), so that
    # ``vllm:num_requests_waiting`` does not take ``vllm:num_requests_waiting_by_reason``.
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"\n(?:{alternatives})[{{ \t][^\n]*")


def select_samples(text: str, names: Iterable[str]) -> str | None:
    """Only the sample lines of ``text`` (the Prometheus text format) whose metric is one of
    ``names``, every label set, for :func:`parse_metrics`; None when there is none (the text may
    not be Prometheus at all: parse it whole to find out). On a vLLM ``/metrics`` of ~450 lines
    this takes ~50 us and the three gauges then parse in ~0.1-0.2 ms, where the whole text takes
    ~7 ms."""
    lines = _sample_pattern(tuple(names)).findall("\n" + text)
    return "".join(lines)[1:] + "\n" if lines else None  # each line came with its newline first


def scrape_metrics(
    url: str, client: httpx.Client | None = None, timeout: float = 5.0
) -> dict[str, float]:
    if client is None:
        with httpx.Client(timeout=timeout) as own:
            response = own.get(url)
    else:
        response = client.get(url, timeout=timeout)
    response.raise_for_status()
    return parse_metrics(response.text)
