// The coordinator's dashboard: polls /dashboard/state and renders it. No dependencies; every
// element is built with textContent (endpoint names come from discovery: never parsed as HTML).
"use strict";

const POLL_MS = 1500;
const KEY_ITEM = "pd-runtime-api-key";

const $ = (id) => document.getElementById(id);

function fmt(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}
const pct = (v) => (v === null || v === undefined ? "–" : `${fmt(v * 100, 1)} %`);
function secs(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1e-3) return `${fmt(v * 1e6, 0)} µs`;
  if (v < 1) return `${fmt(v * 1e3, 1)} ms`;
  return `${fmt(v, 2)} s`;
}

// Writes a number into an element: its exact value in data-value, a readable one as text.
function put(id, value, show = fmt) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = show(value);
}

function cell(row, text, field, value) {
  const td = document.createElement("td");
  td.textContent = text;
  if (field) {
    td.dataset.field = field;
    td.dataset.value = value === null || value === undefined ? "" : String(value);
  }
  row.appendChild(td);
  return td;
}

// A 0..1 value as a bar and a percentage; orange above `warn` (a nearly full KV cache).
function barCell(row, value, field, warn = Infinity) {
  const td = cell(row, "", field, value);
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${Math.min(100, Math.max(0, (value || 0) * 100))}%`;
  if (value !== null && value !== undefined && value > warn) fill.classList.add("high");
  bar.appendChild(fill);
  const label = document.createElement("span");
  label.textContent = pct(value);
  td.append(bar, label);
}

function fill(tableId, rows, build) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(
    ...rows.map((item) => {
      const tr = document.createElement("tr");
      build(tr, item);
      return tr;
    }),
  );
}

function render(s) {
  put("policy", s.policy, String);
  document.querySelectorAll(".rate-s").forEach((el) => (el.textContent = `${fmt(s.window.rate_s, 0)} s`));
  document.querySelectorAll(".span-s").forEach((el) => (el.textContent = `${fmt(s.window.span_s, 0)} s`));

  put("requests-total", s.requests.total);
  put("requests-per-s", s.requests.per_s, (v) => fmt(v, 2));
  put("decisions-total", s.decisions.total);
  put("decisions-per-s", s.decisions.per_s, (v) => fmt(v, 2));
  put("prefix-hit-ratio", s.prefix.hit_ratio, pct);
  put("prefix-hit-ratio-span", s.prefix.hit_ratio_span, pct);
  put("prefix-cached-tokens", s.prefix.cached_tokens);
  put("prefix-prompt-tokens", s.prefix.prompt_tokens);
  put("admitted", s.requests.admitted);
  put("queued", s.requests.queued);
  put("rejected", s.requests.rejected);
  put("errors", s.requests.errors);
  put("retries", s.requests.retries);

  fill("endpoints", s.endpoints, (tr, e) => {
    const health = e.healthy === null || e.healthy === undefined ? "unknown" : e.healthy ? "up" : "down";
    tr.dataset.endpoint = e.name;
    tr.dataset.health = health;
    cell(tr, e.name);
    cell(tr, e.role, "role", e.role);
    cell(tr, e.address);
    const badge = cell(tr, health, "health", health);
    badge.className = `health ${health}`;
    if (e.scrape_failures) badge.title = `${e.scrape_failures} failed scrapes in a row`;
    cell(tr, fmt(e.in_flight), "in_flight", e.in_flight);
    cell(tr, fmt(e.waiting), "waiting", e.waiting);
    cell(tr, fmt(e.running), "running", e.running);
    barCell(tr, e.kv_usage, "kv_usage", 0.9);
    cell(tr, fmt(e.decisions), "decisions", e.decisions);
    barCell(tr, e.share, "share");
  });

  fill("modes", s.decisions.by_mode_reason, (tr, d) => {
    tr.dataset.mode = d.mode;
    tr.dataset.reason = d.reason;
    cell(tr, d.mode);
    cell(tr, d.reason);
    cell(tr, fmt(d.total), "total", d.total);
    cell(tr, fmt(d.per_s, 2), "per_s", d.per_s);
  });

  const latency = [
    ["TTFT (streams)", s.latency.ttft_seconds],
    ["TPOT (streams)", s.latency.tpot_seconds],
    ["request time", s.latency.request_seconds],
    ["decision time", s.latency.decision_seconds],
  ];
  fill("latency", latency, (tr, [label, l]) => {
    cell(tr, label);
    cell(tr, fmt(l.count), "count", l.count);
    for (const q of ["p50", "p90", "p99", "mean"]) cell(tr, secs(l[q]), q, l[q]);
  });

  const learned = s.latency.learned;
  $("learned-off").hidden = learned !== null;
  $("learned").hidden = $("learned-note").hidden = learned === null;
  if (learned !== null) {
    fill("learned", Object.entries(learned), (tr, [address, m]) => {
      cell(tr, address);
      cell(tr, fmt(m.ttft.n));
      cell(tr, secs(m.ttft.intercept));
      cell(tr, secs(m.ttft.slope));
      cell(tr, secs(m.tpot.intercept));
      cell(tr, secs(m.tpot.slope));
    });
  }

  fill("recent", s.recent, (tr, r) => {
    cell(tr, new Date(r.time * 1000).toLocaleTimeString());
    cell(tr, `${fmt(r.seconds, 1)} s`);
    cell(tr, r.decode);
    cell(tr, r.mode);
    cell(tr, r.reason);
    cell(tr, fmt(r.count), "count", r.count);
  });
}

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

async function poll() {
  const headers = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  try {
    const response = await fetch("/dashboard/state", { headers, cache: "no-store" });
    if (response.status === 401) {
      $("key-form").hidden = false;
      setStatus("error", key ? "API key refused" : "API key needed");
      return;
    }
    if (!response.ok) {
      setStatus("error", `state answered ${response.status}`);
      return;
    }
    const state = await response.json();
    $("key-form").hidden = true;
    render(state);
    setStatus("live", `live, ${new Date(state.time * 1000).toLocaleTimeString()}`);
  } catch (err) {
    setStatus("error", `coordinator unreachable (${err.message})`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
});

poll();
