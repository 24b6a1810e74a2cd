"""What the staging connector tells operators: vLLM's NIXL transfer stats plus, per worker, how
many requests were packed and unpacked and how long that took, and every request that took
vLLM's per-block path instead, by reason.

They ride vLLM's own connector-stats channel (worker -> scheduler -> API server, aggregated over
TP ranks) and land on the worker's ``/metrics`` next to ``vllm:nixl_*`` and in its periodic "KV
Transfer metrics" log line, so a staged deployment is observable with the dashboards a vLLM fleet
already has. Reasons are a closed set (:data:`FALLBACK_REASONS`), so the label stays bounded;
they travel as their index in it (vLLM's stats fields are lists of numbers).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import (
    NixlKVConnectorStats,
    NixlPromMetrics,
)
from vllm.v1.metrics.utils import create_metric_per_engine

__all__ = ["FALLBACK_REASONS", "StagingPromMetrics", "StagingStats"]

# Why a request was not moved as one staged slot. Prefill-side reasons are counted on the
# prefill worker (the request then goes per block, its blocks held for the read), decode-side
# ones on the decode worker (per block where the prefill packed nothing; otherwise the prefill
# already gave its blocks back and the decode recomputes the prompt).
FALLBACK_REASONS: dict[str, str] = {
    # prefill: read per block
    "prefill-buffer-full": "no free slot in the prefill's staging buffer",
    "prefill-not-ready": "not every prefill TP rank had reported its staging buffer yet",
    "blocks-changed": "the finished request's blocks were not the ones packed",
    # decode: read per block
    "not-packed": "the prefill sent no staged slot (staging off there, or a prefill reason)",
    # decode: recomputed
    "off-here": "this decode worker does not stage, or the slot's params were malformed",
    "layout": "the prefill packed another KV layout, dtype or head split",
    "topology": "a TP ratio the prefill did not pack for, or different block sizes",
    "decode-buffer-full": "no room in the decode's staging buffer (a released slot waits for "
    "room instead, and counts here only when larger than the whole buffer)",
}

PACK = "pd_pack_seconds"
UNPACK = "pd_unpack_seconds"
FALLBACKS = "pd_staging_fallbacks"
_OURS = (PACK, UNPACK, FALLBACKS)
_REASONS = tuple(FALLBACK_REASONS)


class StagingStats(NixlKVConnectorStats):
    """vLLM's NIXL stats and the staging ones; every field a list of plain values, as vLLM
    serialises it between processes and sums intervals by concatenation."""

    def reset(self) -> None:
        super().reset()
        self.data.update({key: [] for key in _OURS})

    def record_pack(self, seconds: float) -> None:
        self.data[PACK].append(seconds)

    def record_unpack(self, seconds: float) -> None:
        self.data[UNPACK].append(seconds)

    def record_fallback(self, reason: str) -> None:
        if reason not in FALLBACK_REASONS:
            raise ValueError(f"unknown staging fallback reason {reason!r}")
        self.data[FALLBACKS].append(_REASONS.index(reason))

    def fallbacks(self) -> dict[str, int]:
        """Reason -> requests, for the reasons that occurred."""
        counts: dict[str, int] = {}
        for index in self.data.get(FALLBACKS, ()):
            counts[_REASONS[int(index)]] = counts.get(_REASONS[int(index)], 0) + 1
        return counts

    def is_empty(self) -> bool:
        return super().is_empty() and not any(self.data.get(key) for key in _OURS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not other.is_empty():
            for key, values in other.data.items():
                self.data.setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced = super().reduce()
        packs, unpacks = self.data.get(PACK, []), self.data.get(UNPACK, [])
        reduced["Staged packs"] = len(packs)
        if packs:
            reduced["Avg pack (ms)"] = round(1e3 * sum(packs) / len(packs), 3)
        reduced["Staged unpacks"] = len(unpacks)
        if unpacks:
            reduced["Avg unpack (ms)"] = round(1e3 * sum(unpacks) / len(unpacks), 3)
        reduced["Staging fallbacks"] = len(self.data.get(FALLBACKS, []))
        return reduced


class StagingPromMetrics(NixlPromMetrics):
    """``vllm:nixl_*`` and ``pd_staging_*`` (pack/unpack seconds, fallbacks by reason)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        histogram: Any = self._histogram_cls  # vLLM types these as any of the three kinds
        counter: Any = self._counter_cls
        buckets = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]

        def seconds(name: str, documentation: str) -> dict[int, Any]:
            metric = histogram(
                name=name, documentation=documentation, buckets=buckets, labelnames=labelnames
            )
            return create_metric_per_engine(metric, per_engine_labelvalues)

        self.pack_seconds = seconds(
            "pd_staging_pack_seconds",
            "Time a prefill worker spent packing a request's KV blocks into its staging slot "
            "(per TP rank; a step's packs are timed together and shared)",
        )
        self.unpack_seconds = seconds(
            "pd_staging_unpack_seconds",
            "Time a decode worker spent unpacking a staged slot it read into its KV blocks "
            "(per TP rank; the count is the staged reads)",
        )
        self._engine_labels = per_engine_labelvalues
        self.fallbacks = counter(
            name="pd_staging_fallbacks",
            documentation="Requests not moved as one staged slot (counted on each TP rank that "
            "decided it), by reason ("
            + "; ".join(f"{k}: {v}" for k, v in FALLBACK_REASONS.items())
            + ")",
            labelnames=[*labelnames, "reason"],
        )
        for labels in per_engine_labelvalues.values():  # every reason shows, at 0 until it occurs
            for reason in FALLBACK_REASONS:
                self.fallbacks.labels(*labels, reason)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        super().observe(transfer_stats_data, engine_idx)
        for seconds in transfer_stats_data.get(PACK, ()):
            self.pack_seconds[engine_idx].observe(seconds)
        for seconds in transfer_stats_data.get(UNPACK, ()):
            self.unpack_seconds[engine_idx].observe(seconds)
        labels = self._engine_labels[engine_idx]
        for index in transfer_stats_data.get(FALLBACKS, ()):
            self.fallbacks.labels(*labels, _REASONS[int(index)]).inc()
