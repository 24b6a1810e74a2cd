"""Test helper: the numbers the coordinator's dashboard page shows (read from the rendered DOM in
one script call, so from one render) and the same numbers computed from the coordinator's
``/metrics`` text, for the unit and end-to-end browser tests to compare."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.browser import wait_until

_READ_PAGE = """
const v = (el) => (!el || el.dataset.value === "" ? null : Number(el.dataset.value));
const byId = (id) => v(document.getElementById(id));
const out = {
  status: document.getElementById("status").dataset.state,
  requests: byId("requests-total"),
  decisions: byId("decisions-total"),
  prompt_tokens: byId("prefix-prompt-tokens"),
  cached_tokens: byId("prefix-cached-tokens"),
  errors: byId("errors"),
  retries: byId("retries"),
  rejected: byId("rejected"),
  endpoints: {},
  modes: {},
};
for (const tr of document.querySelectorAll("#endpoints tbody tr")) {
  out.endpoints[tr.dataset.endpoint] = {
    role: tr.querySelector("[data-field=role]").dataset.value,
    health: tr.dataset.health,
    decisions: v(tr.querySelector("[data-field=decisions]")),
  };
}
for (const tr of document.querySelectorAll("#modes tbody tr")) {
  out.modes[tr.dataset.mode + "/" + tr.dataset.reason] = v(tr.querySelector("[data-field=total]"));
}
return out;
"""


def read_page(driver: Any) -> dict[str, Any]:
    """The dashboard's numbers as rendered (``data-value``: exact, not the formatted text)."""
    page: dict[str, Any] = driver.execute_script(_READ_PAGE)
    return page


def from_metrics(text: str) -> dict[str, Any]:
    """What the page must show, from the coordinator's ``/metrics`` (the same keys as
    :func:`read_page`, without ``status``; endpoints: decisions per decode endpoint)."""
    sums: dict[str, float] = defaultdict(float)
    by_decode: dict[str, float] = defaultdict(float)
    by_mode: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += sample.value
            if sample.name == "pd_coordinator_decisions_total":
                by_decode[sample.labels["decode"]] += sample.value
                by_mode[f"{sample.labels['mode']}/{sample.labels['reason']}"] += sample.value
    return {
        "requests": sums["pd_coordinator_requests_total"],
        "decisions": sums["pd_coordinator_decisions_total"],
        "prompt_tokens": sums["pd_coordinator_prompt_tokens_total"],
        "cached_tokens": sums["pd_coordinator_cached_prompt_tokens_total"],
        "errors": sums["pd_coordinator_errors_total"],
        "retries": sums["pd_coordinator_retries_total"],
        "rejected": sums["pd_coordinator_rejected_total"],
        "endpoints": dict(by_decode),
        "modes": dict(by_mode),
    }


def comparable(page: dict[str, Any]) -> dict[str, Any]:
    """``read_page``'s answer in :func:`from_metrics`'s shape: decode endpoints' decisions only
    (an endpoint nothing was sent to is not in /metrics), rows with none left out."""
    out = {k: v for k, v in page.items() if k not in ("status", "endpoints")}
    out["endpoints"] = {
        name: e["decisions"]
        for name, e in page["endpoints"].items()
        if e["role"] == "decode" and e["decisions"]
    }
    return out


def open_live(driver: Any, base_url: str, timeout_s: float = 10.0) -> None:
    """Open the coordinator's dashboard and wait for its first render of the state."""
    driver.get(f"{base_url}/dashboard")
    wait_until(lambda: read_page(driver)["status"] == "live", timeout_s, "the first render")


def wait_matching(driver: Any, metrics_text: Callable[[], str], timeout_s: float) -> float:
    """Wait until the page shows what ``/metrics`` (``metrics_text()``) says; return seconds."""
    return wait_until(
        lambda: comparable(read_page(driver)) == from_metrics(metrics_text()),
        timeout_s,
        "the page to show what /metrics says",
    )


def latency_count(driver: Any, label: str) -> float | None:
    """The count the page shows in its latency table's row ``label`` (e.g. "TTFT (streams)")."""
    count: float | None = driver.execute_script(
        """
        for (const tr of document.querySelectorAll("#latency tbody tr")) {
          if (tr.cells[0].textContent === arguments[0]) {
            const el = tr.querySelector("[data-field=count]");
            return el && el.dataset.value !== "" ? Number(el.dataset.value) : null;
          }
        }
        return null;
        """,
        label,
    )
    return count
