"""The staging connector's stats: what the workers record reaches the API server's /metrics
through vLLM's connector-stats channel (serialised, summed over TP ranks and intervals) and its
"KV Transfer metrics" log line; vLLM's own NIXL figures stay as they were."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pd_runtime.worker.staging_connector import PdStagingConnector
from pd_runtime.worker.staging_stats import FALLBACK_REASONS, StagingStats


def _rank(packs: list[float], fallbacks: list[str]) -> StagingStats:
    stats = StagingStats()
    for seconds in packs:
        stats.record_pack(seconds)
    for reason in fallbacks:
        stats.record_fallback(reason)
    return stats


def test_stats_survive_the_trip_and_sum_over_ranks_and_intervals() -> None:
    rank0 = _rank([0.002, 0.004], ["prefill-buffer-full"])
    rank1 = _rank([0.003], ["prefill-buffer-full", "blocks-changed"])
    rank1.record_unpack(0.001)
    # Worker -> API server: vLLM sends to_dict() through msgpack and rebuilds with the class.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(rank1.clone_and_reset().to_dict()))
    received = PdStagingConnector.build_kv_connector_stats(wire)
    assert rank1.is_empty()  # the interval was handed over
    total = PdStagingConnector.build_kv_connector_stats(rank0.to_dict()).aggregate(received)
    assert isinstance(total, StagingStats)
    assert total.fallbacks() == {"prefill-buffer-full": 2, "blocks-changed": 1}
    reduced = total.reduce()
    assert reduced["Staged packs"] == 3 and reduced["Avg pack (ms)"] == 3.0
    assert reduced["Staged unpacks"] == 1 and reduced["Staging fallbacks"] == 3
    assert reduced["Num successful transfers"] == 0  # vLLM's part of the line is unchanged


def test_an_interval_with_only_staging_events_is_not_dropped() -> None:
    # vLLM skips empty stats; NIXL's own notion of empty would lose a pack-only interval.
    assert StagingStats().is_empty()
    assert not _rank([0.001], []).is_empty()
    assert not _rank([], ["not-packed"]).is_empty()
    with pytest.raises(ValueError, match="unknown staging fallback reason"):
        StagingStats().record_fallback("because")


def test_prometheus_shows_packs_unpacks_and_every_reason() -> None:
    registry = CollectorRegistry()
    types = {
        kind: functools.partial(kind, registry=registry) for kind in (Gauge, Counter, Histogram)
    }
    config = SimpleNamespace(kv_transfer_config=None)
    prom = PdStagingConnector.build_prom_metrics(
        config,  # type: ignore[arg-type]
        types,  # type: ignore[arg-type]
        ["model_name", "engine"],
        {0: ["tiny", "0"]},
    )
    stats = _rank([0.002, 0.0005], ["decode-buffer-full", "decode-buffer-full", "layout"])
    stats.record_unpack(0.003)
    prom.observe(stats.to_dict(), 0)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "tiny", "engine": "0", **labels})

    assert sample("pd_staging_pack_seconds_count") == 2
    assert sample("pd_staging_pack_seconds_sum") == pytest.approx(0.0025)
    assert sample("pd_staging_unpack_seconds_count") == 1
    assert sample("pd_staging_fallbacks_total", reason="decode-buffer-full") == 2
    assert sample("pd_staging_fallbacks_total", reason="layout") == 1
    for reason in set(FALLBACK_REASONS) - {"decode-buffer-full", "layout"}:
        assert sample("pd_staging_fallbacks_total", reason=reason) == 0, reason
    assert sample("vllm:nixl_num_descriptors_count") == 0  # vLLM's metrics still there
