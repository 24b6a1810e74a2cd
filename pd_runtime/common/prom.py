"""Read a worker's Prometheus metrics (vLLM's ``/metrics``) into plain numbers."""

from __future__ import annotations

from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["parse_metrics", "scrape_metrics"]


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name → value summed over label sets (e.g. over vLLM's ``model_name`` label)."""
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


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
