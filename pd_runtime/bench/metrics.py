"""From per-request records to the summary numbers (p50/p90/p99, throughput, goodput).

Latency percentiles (``pd_runtime.common.stats.percentile``: linear interpolation, numpy's
default) are over successful requests only (a failed request has no TTFT); errors are
counted beside them. Throughput and goodput divide by the run's wall time (first send to last
answer). Goodput counts only successful requests that meet every SLO given (``ttft_ms``,
``tpot_ms``, ``itl_ms`` = the request's worst gap, ``e2e_ms``), as in DistServe / vLLM's
``--goodput``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pd_runtime.bench.client import RequestRecord
from pd_runtime.common.stats import percentile

__all__ = ["SLO_KEYS", "meets_slos", "parse_slos", "summarize"]

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in SLO_KEYS or not value:
            raise ValueError(f"bad SLO {item!r}: use KEY=MILLISECONDS with KEY one of {SLO_KEYS}")
        slos[key] = float(value)
    return slos


def meets_slos(record: RequestRecord, slos: Mapping[str, float]) -> bool:
    if not record.ok:
        return False
    values = {
        "ttft_ms": record.ttft_s,
        "tpot_ms": record.tpot_s,
        "itl_ms": max(record.itl_s) if record.itl_s else None,
        "e2e_ms": record.e2e_s,
    }
    for key, limit in slos.items():
        value = values[key]
        # A request with one output token has no TPOT/ITL: nothing to violate.
        if value is not None and value * 1000 > limit:
            return False
    return True


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(percentile(values, q) * 1000, 3) if values else None


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slos: Mapping[str, float]
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    good = sum(1 for r in ok if meets_slos(r, slos))
    per_s = (lambda n: round(n / duration_s, 4)) if duration_s > 0 else (lambda n: None)
    summary: dict[str, Any] = {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "duration_s": round(duration_s, 3),
        "prompt_tokens": sum(prompts) if prompts else None,
        "output_tokens": out_tokens,
        "throughput_rps": per_s(len(ok)),
        "output_tok_s": per_s(out_tokens),
        "goodput_rps": per_s(good),
        "slos": dict(slos),
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_ms"] = _ms(values, q)
        summary[f"{name}_mean_ms"] = round(sum(values) / len(values) * 1000, 3) if values else None
    return summary
