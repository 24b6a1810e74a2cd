"""The KV-cache-aware scheduler: precise prefix index, load signals, profiles, P/D decider.

Per request:
  1. ``prepare`` (awaited; the BPE of much new text runs off the event loop): tokenize the
     prompt as the engine will (chat template included) and key its full blocks (:mod:`pd_runtime.kv_events.keys`);
  2. ``schedule`` (on the loop, no I/O): look the keys up in the KV-event index and in the
     pending overlay (requests routed but not yet reported by their engine), run the decode
     profile, let the decider choose direct or disaggregated, run the prefill profile if so,
     and book the request's load on the chosen endpoints;
  3. ``release``: unbook it. In between, the coordinator reports the answer's first chunk and a
     stream's end: they teach the latency model (:mod:`pd_runtime.scheduling.latency`) read by the
     ``predicted-latency`` scorer, the ``slo`` filter and the decider's ``predicted`` mode.

Background: one ZMQ subscriber per endpoint feeding the index, and the metrics scraper.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import ConfigError, NoEndpointError
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.kv_events.manager import KVEventsManager
from pd_runtime.kv_events.native import IMPLEMENTATION, NOT_NATIVE_BECAUSE
from pd_runtime.scheduling.base import Scheduler, SchedulingRequest, SchedulingResult
from pd_runtime.scheduling.decider import PDDecider
from pd_runtime.scheduling.filters.slo import SLOFilter
from pd_runtime.scheduling.latency import LatencyModel
from pd_runtime.scheduling.pending import PendingPrefixes
from pd_runtime.scheduling.plugins import EndpointState, RequestContext
from pd_runtime.scheduling.profile import (
    PluginSpec,
    ProfileConfig,
    ProfileResult,
    SchedulingProfile,
)
from pd_runtime.scheduling.scorers.predicted_latency import PredictedLatencyScorer
from pd_runtime.scheduling.scraper import MetricsScraper
from pd_runtime.scheduling.tokenize import PromptTokenizer

__all__ = [
    "DEFAULT_PROFILES",
    "LATENCY_LED_DECODE_PROFILE",
    "REPLICATED_PROFILES",
    "KVAwareParams",
    "KVAwareScheduler",
]

log = logging.getLogger(__name__)


def _specs(*entries: dict[str, Any]) -> list[PluginSpec]:
    return [PluginSpec.model_validate(e) for e in entries]


#: Stick to the endpoint holding the prefix (weight 3 against 1 per load signal) until it
#: saturates (the not-saturated filter), then spill over; cold prompts spread by recent homes.
DEFAULT_PROFILES: dict[str, ProfileConfig] = {
    "decode": ProfileConfig(
        filters=_specs({"type": "healthy"}, {"type": "not-saturated"}),
        scorers=_specs(
            {"type": "prefix-cache", "weight": 3},
            {"type": "in-flight-load", "weight": 1},
            {"type": "queue-depth", "weight": 1},
            {"type": "kv-cache-utilization", "weight": 1},
            {"type": "session-affinity", "weight": 1},
            {"type": "cold-spreader", "weight": 1},
        ),
    ),
    "prefill": ProfileConfig(
        filters=_specs({"type": "healthy"}, {"type": "not-saturated"}),
        scorers=_specs(
            {"type": "prefix-cache", "weight": 2},
            {"type": "in-flight-load", "weight": 1},
            {"type": "queue-depth", "weight": 1},
        ),
    ),
}


#: The decode profile led by the learned latency model (with ``pd_decider: predicted``, the
#: setting the scenario benchmark's ``pd-latency-led`` front measures): its prediction of the
#: whole answer's time already counts each endpoint's uncached tokens, the prefill work queued
#: there and its batch, i.e. what prefix-cache and the load scorers approximate, and adds speed.
LATENCY_LED_DECODE_PROFILE = DEFAULT_PROFILES["decode"].model_copy(
    update={
        "scorers": _specs(
            {"type": "predicted-latency", "weight": 4},
            {"type": "prefix-cache", "weight": 1},
            {"type": "in-flight-load", "weight": 1},
        )
    }
)


def _replicated(profile: ProfileConfig) -> ProfileConfig:
    """The same profile for a coordinator with replicas: no cold-spreader (its recent-homes count
    is one replica's own), ties broken by the prompt's first block (the same choice everywhere)."""
    return profile.model_copy(
        update={
            "scorers": [s for s in profile.scorers if s.type != "cold-spreader"],
            "picker": PluginSpec.model_validate({"type": "max-score", "tie_break": "prefix"}),
        }
    )


#: The default profiles when ``replicas`` > 1: replicas do not see each other's in-flight claims
#: (the pending overlay), so a new prefix's home must follow from the prompt, not from history.
REPLICATED_PROFILES: dict[str, ProfileConfig] = {
    name: _replicated(profile) for name, profile in DEFAULT_PROFILES.items()
}


class KVAwareParams(BaseModel):
    """``coordinator.scheduler.params`` for ``policy: kv-aware``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str | None = Field(
        default=None, description="tokenizer name or path; none: no prefix matching"
    )
    tokenizer_cache_tokens: int = Field(
        default=4_000_000,
        ge=0,
        description="token ids of rendered chat segments (the text between special tokens: a "
        "system prompt, earlier turns) kept for reuse, 4 bytes each plus the segment's text; "
        "0: encode every prompt whole",
    )
    block_size: int = Field(default=32, ge=1, description="the engines' KV block size")
    pd_threshold_tokens: int = Field(default=256, ge=0)
    pd_decider: Literal["threshold", "predicted"] = Field(
        default="threshold",
        description="threshold: disaggregate when the decode endpoint's uncached tokens reach "
        "pd_threshold_tokens; predicted: when the learned latency model predicts P/D's TTFT "
        "lower than the decode endpoint's own by pd_margin (the threshold rule until warm)",
    )
    pd_margin: float = Field(default=0.2, ge=0, description="predicted: P/D must win by this share")
    pd_handover_s: float = Field(
        default=0.01, ge=0, description="fixed cost of the P/D hops in predicted TTFTs (s)"
    )
    transfer_s_per_token: float | None = Field(
        default=None,
        ge=0,
        description="KV transfer seconds per token when the decode workers' NIXL histogram is not "
        "read (None: 0, the transfer is then learnt as part of the prefill endpoints' TTFT)",
    )
    latency_min_samples: int = Field(
        default=8, ge=1, description="observations before an endpoint's latency model is used"
    )
    latency_half_life: float = Field(
        default=32.0, gt=0, description="latency model: samples after which one weighs half"
    )
    session_header: str = "x-session-id"
    default_max_tokens: int = Field(default=256, ge=0)
    scrape_interval_s: float = Field(default=0.5, gt=0)
    unhealthy_after_failures: int = Field(default=3, ge=1)
    pending_ttl_s: float = Field(default=10.0, ge=0)
    seed: int | None = None
    log_breakdown_top_k: int = Field(
        default=4,
        ge=0,
        description="the decision line's breakdown covers the endpoints with the k best totals "
        "of each profile (and the one picked); every endpoint when the coordinator logs at "
        "DEBUG; 0: none at INFO",
    )
    profiles: dict[str, ProfileConfig] = Field(default_factory=lambda: dict(DEFAULT_PROFILES))
    replicas: int = Field(
        default=1,
        ge=1,
        description="coordinator replicas sharing the traffic (the launcher sets it from "
        "coordinator.replicas); above 1 the profiles not given here are REPLICATED_PROFILES",
    )


def _prefix_scores(cached: dict[str, int], blocks: int) -> dict[str, float] | None:
    """The decision's ``scores``: the share of the prompt's ``blocks`` each endpoint holding a
    part of it holds (``cached``: endpoint -> leading blocks), rounded to 4 digits; None: none."""
    if not blocks:
        return None
    # round() of a float is slow (a decimal conversion): once per distinct n, not per endpoint
    rounded = {n: round(n / blocks, 4) for n in set(cached.values())}
    scores = dict(zip(cached, map(rounded.__getitem__, cached.values()), strict=True))
    if 0 in rounded:  # not from the index's walk, which reports only n > 0; keep the rule
        scores = {a: v for a, v in scores.items() if cached[a] > 0}
    return scores or None


def _breakdown(runs: Sequence[ProfileResult], top_k: int | None) -> dict[str, dict[str, float]]:
    """Scorer (and ``total``) → endpoint → score over the profile runs, for the endpoints with the
    ``top_k`` best totals of each run and the one it picked (every endpoint when None)."""
    breakdown: dict[str, dict[str, float]] = {}
    if top_k == 0:
        return breakdown
    for run in runs:
        if top_k is None or len(run.addresses) <= top_k:
            for scorer, values in run.scores.items():
                breakdown.setdefault(scorer, {}).update(values)
            breakdown.setdefault("total", {}).update(run.totals)
            continue
        # = sorted(totals, key=..., reverse=True)[:top_k] (stable: ties keep candidate order),
        # on the arrays, so no dict of every endpoint is built
        addrs = run.addresses
        keep = np.argsort(-run.total, kind="stable")[:top_k].tolist()
        picked = addrs.index(run.picked.address)
        if picked not in keep:
            keep.append(picked)
        kept = [addrs[i] for i in keep]
        for scorer, array in run.arrays.items():
            breakdown.setdefault(scorer, {}).update(zip(kept, array[keep].tolist(), strict=True))
        breakdown.setdefault("total", {}).update(zip(kept, run.total[keep].tolist(), strict=True))
    return breakdown


class KVAwareScheduler(Scheduler):
    def __init__(self, endpoints: Sequence[EndpointConfig], **params: Any) -> None:
        super().__init__(endpoints)
        try:
            self.params = KVAwareParams.model_validate(params)
        except ValueError as exc:
            raise ConfigError(f"scheduler.params: {exc}") from None
        p = self.params
        unknown = set(p.profiles) - {"decode", "prefill"}
        if unknown:
            raise ConfigError(f"scheduler.params.profiles: unknown profiles {sorted(unknown)}")
        defaults = DEFAULT_PROFILES if p.replicas == 1 else REPLICATED_PROFILES
        profiles = {**defaults, **(p.profiles if "profiles" in p.model_fields_set else {})}
        self.states = {e.address: EndpointState(e) for e in self.endpoints}
        self.decode_states = [s for s in self.states.values() if s.role == "decode"]
        self.prefill_states = [s for s in self.states.values() if s.role == "prefill"]
        self.decode_profile = SchedulingProfile("decode", profiles["decode"])
        self.prefill_profile = SchedulingProfile("prefill", profiles["prefill"])
        self.decider = PDDecider(p.pd_threshold_tokens, mode=p.pd_decider, margin=p.pd_margin)
        # The latency model is only fed when something reads it: no per-chunk timing otherwise.
        self.times_answers = p.pd_decider == "predicted" or any(
            isinstance(plugin, (PredictedLatencyScorer, SLOFilter))
            for profile in (self.decode_profile, self.prefill_profile)
            for plugin in (*profile.filters, *(s for s, _ in profile.scorers))
        )
        self.latency = LatencyModel(
            min_samples=p.latency_min_samples,
            half_life=p.latency_half_life,
            handover_s=p.pd_handover_s,
            transfer_s_per_token=p.transfer_s_per_token,
        )
        self.index = PrefixIndex()
        self.events = KVEventsManager(self.index)
        self.pending = PendingPrefixes(p.pending_ttl_s, bit_of=self.index.endpoint_bit)
        self.tokenizer = (
            PromptTokenizer(p.tokenizer, cache_tokens=p.tokenizer_cache_tokens)
            if p.tokenizer
            else None
        )
        self.scraper = MetricsScraper(
            list(self.states.values()),
            interval_s=p.scrape_interval_s,
            unhealthy_after=p.unhealthy_after_failures,
        )
        self.rng = random.Random(p.seed)
        # id(request) -> its booking. Holding the request keeps its id from being reused by
        # another request before release().
        self._booked: dict[int, _Booking] = {}

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if IMPLEMENTATION == "native":
            log.info("prefix index: compiled keying and walk (kv_events/_native.c)")
        else:
            log.warning(
                "prefix index: the compiled module is not in use (%s); keying and walking in "
                "Python, several times slower",
                NOT_NATIVE_BECAUSE,
            )
        if self.tokenizer is not None:
            await self.tokenizer.aload()
        for state in self.states.values():
            await self._attach(state)
        await self.scraper.start()

    async def _attach(self, state: EndpointState) -> None:
        self.index.add_endpoint(state.address)
        if state.config.kv_events:
            # Usually workers connect to us (see kv_events.subscriber); on Kubernetes we connect
            # to them (kv_events_bind false). Either way the topic prefix pins the socket to the
            # one worker whose topic is kv@HOST:PORT@MODEL.
            await self.events.add(
                state.address,
                state.config.kv_events,
                topic=f"kv@{state.address}@",
                replay_address=state.config.kv_events_replay,
                bind=state.config.kv_events_bind,
            )

    async def set_endpoints(self, endpoints: Sequence[EndpointConfig]) -> None:
        """Discovery: add new addresses, drop missing ones (their blocks, pending claims and
        subscriber go; in-flight requests there still release cleanly), and re-subscribe an
        endpoint whose config changed. The state lists are swapped whole, so ``schedule``
        (same loop) never sees a half-updated set."""
        wanted = {e.address: e for e in endpoints}
        states = dict(self.states)
        removed = [a for a in states if a not in wanted]
        for address in removed:
            del states[address]
            self.latency.forget(address)
            self.pending.forget_endpoint(address)  # before the index frees its bit
            await self.events.remove(address)
        attach: list[EndpointState] = []
        for address, config in wanted.items():
            old = states.get(address)
            if old is not None and old.config == config:
                continue
            state = EndpointState(config)
            if old is not None:  # same address, new config: keep the load it carries
                state.in_flight_requests = old.in_flight_requests
                state.in_flight_tokens = old.in_flight_tokens
                state.pending_prefill_tokens = old.pending_prefill_tokens
                state.awaiting_first_token = old.awaiting_first_token
            states[address] = state
            attach.append(state)
        if not removed and not attach:
            return
        self.endpoints = list(endpoints)
        self.states = states
        self.decode_states = [s for s in states.values() if s.role == "decode"]
        self.prefill_states = [s for s in states.values() if s.role == "prefill"]
        self.scraper.set_endpoints(list(states.values()))
        for state in attach:
            await self._attach(state)
        log.info(
            "endpoints now: %d decode, %d prefill (added/changed %s, removed %s)",
            len(self.decode_states),
            len(self.prefill_states),
            [s.address for s in attach],
            removed,
        )

    async def stop(self) -> None:
        await self.scraper.stop()
        await self.events.stop()
        if self.tokenizer is not None:
            self.tokenizer.close()

    # ---- per request ------------------------------------------------------------------------

    async def prepare(self, request: SchedulingRequest) -> SchedulingRequest:
        if self.tokenizer is None:
            return request
        token_ids = await self.tokenizer.atokenize(request.path, request.body)
        if token_ids is None:
            return request
        keys = PrefixIndex.block_keys(token_ids, self.params.block_size)
        return _with_prompt(request, token_ids, keys)

    def context(self, request: SchedulingRequest) -> RequestContext:
        keys = request.block_keys or []
        # One walk over the index with the pending claims laid over it: a block counts as held
        # if the engine reported it or a request that will store it was just routed there.
        cached = (
            self.index.match(keys, claims=self.pending.live_heads() if self.pending else None)
            if keys
            else {}
        )
        return RequestContext(
            request=request,
            token_ids=request.token_ids,
            block_size=self.params.block_size,
            block_keys=keys,
            cached_blocks=cached,
            session=request.headers.get(self.params.session_header),
            rng=self.rng,
            latency=self.latency,
            max_new_tokens=self._max_new_tokens(request.body),
        )

    def _max_new_tokens(self, body: dict[str, Any]) -> int:
        max_new = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_new, int) or max_new < 0:
            return self.params.default_max_tokens
        return max_new

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        ctx = self.context(request)
        candidates = self.decode_states
        prefills = self.prefill_states
        if request.eligible is not None:  # e.g. a LoRA adapter's holders
            candidates = [s for s in candidates if s.address in request.eligible]
            prefills = [s for s in prefills if s.address in request.eligible]
            if not candidates:
                raise NoEndpointError(f"no decode endpoint serves the model {request.model!r}")
        if request.exclude:
            candidates = [s for s in candidates if s.address not in request.exclude]
            if not candidates:
                raise NoEndpointError("every decode endpoint has been tried for this request")
        decode_run = self.decode_profile.run(ctx, candidates)
        decode = decode_run.picked
        decision = self.decider.decide(ctx, decode, bool(prefills), prefills)
        prefill_run = None
        if decision.disaggregate:
            try:
                prefill_run = self.prefill_profile.run(ctx, prefills)
            except NoEndpointError:
                # Every prefill endpoint is down or filtered: the decode worker prefills itself,
                # slower but served (a P/D deployment must not fail because P is gone).
                decision = replace(decision, disaggregate=False, reason="no-prefill-available")
        prefill = prefill_run.picked if prefill_run else None
        self._book(request, ctx, decode, prefill)

        runs = (decode_run, prefill_run) if prefill_run else (decode_run,)
        cached, blocks = ctx.cached_blocks, len(ctx.block_keys)
        return SchedulingResult(
            decode=decode.config,
            prefill=prefill.config if prefill else None,
            scores=lambda: _prefix_scores(cached, blocks),
            breakdown=lambda: _breakdown(runs, self.params.log_breakdown_top_k),
            full_breakdown=lambda: _breakdown(runs, None),
            prompt_tokens=ctx.prompt_tokens if ctx.token_ids is not None else None,
            cached_tokens=(
                min(ctx.cached_tokens(decode.address), ctx.prompt_tokens)
                if ctx.token_ids is not None
                else None
            ),
            reason=decision.reason,
            slo=ctx.slo,
        )

    def release(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        booked = self._booked.pop(id(request), None)
        if booked is None:
            return
        if not booked.first_chunk:
            self._prefilled(booked)
        tokens, prompt_tokens = booked.tokens, booked.prompt_tokens
        # An endpoint removed by discovery meanwhile has no state left to unbook.
        decode = self.states.get(result.decode.address)
        if decode is not None:
            decode.in_flight_requests -= 1
            decode.in_flight_tokens -= tokens
        if result.prefill is not None:
            prefill = self.states.get(result.prefill.address)
            if prefill is not None:
                prefill.in_flight_requests -= 1
                prefill.in_flight_tokens -= prompt_tokens

    def _prefilled(self, booked: _Booking) -> None:
        booked.first_chunk = True
        state = self.states.get(booked.prefilled_at)
        if state is not None:
            state.pending_prefill_tokens -= booked.prefill_tokens
            state.awaiting_first_token.pop(id(booked.request), None)

    def first_chunk(
        self, request: SchedulingRequest, result: SchedulingResult, ttft_s: float | None
    ) -> None:
        """The prompt is prefilled: unqueue its tokens; a stream's TTFT teaches the model the
        prefilling endpoint's line (and a disaggregated one's transfer into the decode one)."""
        booked = self._booked.get(id(request))
        if booked is None or booked.first_chunk:
            return
        self._prefilled(booked)
        if not booked.tokenized:
            return
        decode = result.decode.address
        if result.prefill is None:
            if ttft_s is not None:
                self.latency.observe_ttft(decode, booked.work_tokens, ttft_s)
            return
        state = self.states.get(decode)
        self.latency.observe_transfer(
            decode,
            booked.transferred_tokens,
            state.nixl_xfer_seconds_sum if state is not None else None,
            state.nixl_xfer_count if state is not None else None,
        )
        if ttft_s is not None:
            self.latency.observe_pd_ttft(
                result.prefill.address,
                decode,
                booked.work_tokens,
                booked.transferred_tokens,
                ttft_s,
            )

    def stream_end(
        self, request: SchedulingRequest, result: SchedulingResult, tpot_s: float
    ) -> None:
        booked = self._booked.get(id(request))
        if booked is not None:
            self.latency.observe_tpot(result.decode.address, booked.batch, tpot_s)

    def report_failure(self, endpoint: EndpointConfig, error: str) -> None:
        """Unhealthy at once (the ``healthy`` filter skips it); the scraper's next good scrape of
        its metrics makes it healthy again. The booking is undone by the ``release`` that the
        coordinator calls for the failed attempt."""
        state = self.states.get(endpoint.address)
        if state is not None and state.healthy:
            state.healthy = False
            log.warning("%s marked unhealthy: forwarding failed (%s)", endpoint.address, error)

    def _book(
        self,
        request: SchedulingRequest,
        ctx: RequestContext,
        decode: EndpointState,
        prefill: EndpointState | None,
    ) -> None:
        tokens = ctx.prompt_tokens + ctx.max_new_tokens
        decode.in_flight_requests += 1
        decode.in_flight_tokens += tokens
        # Who prefills, and its u + Q before this request (the latency model's x).
        at = prefill if prefill is not None else decode
        uncached = ctx.uncached_tokens(at.address)
        booking = _Booking(
            request,
            tokens,
            ctx.prompt_tokens,
            prefilled_at=at.address,
            prefill_tokens=uncached,
            work_tokens=uncached + at.pending_prefill_tokens,
            transferred_tokens=ctx.uncached_tokens(decode.address),
            batch=decode.in_flight_requests,
            tokenized=ctx.token_ids is not None,
        )
        at.pending_prefill_tokens += uncached
        # Only a stream's first chunk marks the end of its prefill (a whole answer arrives at
        # its end), and only a latency-learning scheduler is told when it comes.
        if self.times_answers and request.body.get("stream") is True:
            at.awaiting_first_token[id(request)] = time.monotonic()
        # Claim only the blocks beyond what the endpoint already holds: the walk in context()
        # joins the claims to the indexed prefix.
        keys, held = ctx.block_keys, ctx.cached_blocks
        if prefill is not None:
            prefill.in_flight_requests += 1
            prefill.in_flight_tokens += ctx.prompt_tokens
            self.pending.add(prefill.address, keys[held.get(prefill.address, 0) :])
        self.pending.add(decode.address, keys[held.get(decode.address, 0) :])
        self._booked[id(request)] = booking

    # ---- introspection ----------------------------------------------------------------------

    def explain(self, request: SchedulingRequest) -> dict[str, Any]:
        keys = request.block_keys or []
        return {
            "prompt_tokens": len(request.token_ids) if request.token_ids is not None else None,
            "blocks": len(keys),
            "block_size": self.params.block_size,
            "indexed": self.index.match(keys) if keys else {},
            "expected": self.index.match(keys, claims=self.pending.live_heads()) if keys else {},
        }

    def debug_state(self) -> dict[str, Any]:
        counts = self.index.endpoint_counts()
        subscribers = self.events.subscribers
        endpoints = []
        for state in self.states.values():
            sub = subscribers.get(state.address)
            endpoints.append(
                {
                    **state.snapshot(),
                    "indexed_blocks": counts.get(state.address, {}),
                    "kv_events": state.config.kv_events,
                    "subscriber": asdict(sub.stats) if sub is not None else None,
                }
            )
        return {
            "policy": "kv-aware",
            "endpoints": endpoints,
            "index": {"keys": self.index.size(), "stats": asdict(self.index.stats)},
            "pending_keys": len(self.pending),
            "tokenizer": {
                "name": self.params.tokenizer,
                "loaded": bool(self.tokenizer and self.tokenizer.loaded),
                **(self.tokenizer.describe() if self.tokenizer else {}),
            },
            "block_size": self.params.block_size,
            "pd_threshold_tokens": self.params.pd_threshold_tokens,
            "pd_decider": self.params.pd_decider,
            "latency": self.latency.describe(),
            "profiles": {
                "decode": self.decode_profile.describe(),
                "prefill": self.prefill_profile.describe(),
            },
            "scrape_rounds": self.scraper.rounds,
        }


class _Booking:
    """What ``_book`` added for one request, and the latency model's features at the decision."""

    __slots__ = (
        "batch",
        "first_chunk",
        "prefill_tokens",
        "prefilled_at",
        "prompt_tokens",
        "request",
        "tokenized",
        "tokens",
        "transferred_tokens",
        "work_tokens",
    )

    def __init__(
        self,
        request: SchedulingRequest,
        tokens: int,
        prompt_tokens: int,
        *,
        prefilled_at: str,
        prefill_tokens: int,
        work_tokens: int,
        transferred_tokens: int,
        batch: int,
        tokenized: bool,
    ) -> None:
        self.request = request  # keeps id(request) from being reused before release()
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.prefilled_at = prefilled_at  # the endpoint computing the prompt
        self.prefill_tokens = prefill_tokens  # its uncached part, queued there until prefilled
        self.work_tokens = work_tokens  # u + Q there at the decision
        self.transferred_tokens = transferred_tokens  # KV pulled by decode when disaggregated
        self.batch = batch  # our requests at decode, this one included
        self.tokenized = tokenized
        self.first_chunk = False


def _with_prompt(
    request: SchedulingRequest, token_ids: list[int], keys: list[int]
) -> SchedulingRequest:
    return replace(request, token_ids=token_ids, block_keys=keys)
