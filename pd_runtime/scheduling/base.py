"""The scheduler seam between the coordinator's HTTP layer and routing policy.

Contract: ``prepare`` may do slow work off the event loop (tokenizing) and returns the request
with what it learned; ``schedule`` is then called once per generation request, on the event loop,
and must not block. It returns the decode endpoint
that will serve the request and, when disaggregation pays, the prefill endpoint whose KV blocks the
decode worker will pull. ``scores`` is what the ``Got pod scores`` line logs: endpoint address →
score in [0, 1], or ``None`` when the policy used no scores. ``release`` is called exactly once per
scheduled request when it ends (success or not), so policies can track in-flight load.
``report_failure`` is called when the coordinator could not reach a decode endpoint (connect error,
reset, timeout or a 502/503/504 before any byte reached the client); the coordinator then calls
``release`` for that attempt and schedules the request again with the failed endpoint's address in
``SchedulingRequest.exclude``, which every policy must honour (never pick an excluded decode
endpoint; raise :class:`~pd_runtime.errors.NoEndpointError` when none is left).
What the coordinator sees of the answer is reported for policies that learn latency: at most once
per attempt and before its ``release``, ``first_chunk`` when the answer's first body bytes came
back (with the seconds since the request was sent when the answer is a stream, so a TTFT), and
``stream_end`` when a successful stream ended (with its seconds per output token).
Raise :class:`~pd_runtime.errors.NoEndpointError` when nothing can serve the request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from pd_runtime.config.endpoint import EndpointConfig

__all__ = ["Breakdown", "Scheduler", "SchedulingRequest", "SchedulingResult"]

#: Scorer (and ``total``) -> endpoint address -> score: the decision line's ``breakdown``.
Breakdown = dict[str, dict[str, float]]
T = TypeVar("T")


@dataclass(frozen=True)
class SchedulingRequest:
    request_id: str
    model: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    #: Filled by ``prepare`` when the policy tokenizes: the prompt as the engine will see it.
    token_ids: list[int] | None = None
    #: Filled by ``prepare`` with ``token_ids``: the keys of the prompt's full KV blocks.
    block_keys: list[int] | None = None
    #: Addresses of decode endpoints already tried for this request (failover): never pick these.
    exclude: frozenset[str] = frozenset()
    #: Addresses that may serve this request at all, decode and prefill alike (a LoRA adapter's
    #: holders); None: every endpoint. A policy never picks another one, and disaggregates only
    #: to an eligible prefill endpoint (none: it serves direct).
    eligible: frozenset[str] | None = None


class _OnFirstRead(Generic[T]):
    """A dataclass field that takes a value or a function making it, called on the first read
    (then kept; its default is None). Why: the decision line's breakdown costs more than the
    rest of a 64-endpoint decision (dicts of every scorer's scores), and its scores are a dict
    over every endpoint holding a part of the prompt; built in ``schedule`` they are paid by
    every request, built on first read only by a request whose line is logged (or traced),
    after its decision."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    @overload
    def __get__(self, obj: None, owner: Any = None) -> None: ...
    @overload
    def __get__(self, obj: object, owner: Any = None) -> T | None: ...
    def __get__(self, obj: object | None, owner: Any = None) -> T | None:
        if obj is None:  # the dataclass's default
            return None
        value = obj.__dict__.get(self._slot)
        if callable(value):
            value = obj.__dict__[self._slot] = value()
        return value

    def __set__(self, obj: object, value: T | Callable[[], T | None] | None) -> None:
        obj.__dict__[self._slot] = value  # frozen: only the dataclass's __init__ sets it


@dataclass(frozen=True)
class SchedulingResult:
    decode: EndpointConfig
    prefill: EndpointConfig | None
    #: ``scores`` (see the module's docstring) may be passed as a function that makes it, too.
    scores: _OnFirstRead[dict[str, float]] = _OnFirstRead()
    #: Scorer (and ``total``) → endpoint → score, for the decision line: the policy may keep only
    #: its best-scored endpoints here (kv-aware: ``log_breakdown_top_k``), and may pass a
    #: function that builds it instead (called on the first read: only a logged line pays) ...
    breakdown: _OnFirstRead[Breakdown] = _OnFirstRead()
    #: ... and build every endpoint's on demand (the line at DEBUG). None: ``breakdown`` is whole.
    full_breakdown: Callable[[], Breakdown] | None = field(default=None, repr=False, compare=False)
    #: Prompt tokens, and how many of them the decode endpoint already holds (None: unknown).
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    #: Why the request is (not) disaggregated, for logs and metrics.
    reason: str | None = None
    #: Latency targets: "met" (an endpoint is predicted to meet them), "unmet" (none is; the one
    #: with the most headroom was chosen), None (no targets or no prediction).
    slo: str | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class Scheduler(ABC):
    #: Whether the coordinator should time answers for :meth:`first_chunk` / :meth:`stream_end`
    #: (a clock read and a byte count per streamed chunk): only for a policy that learns from it.
    times_answers: bool = False

    def __init__(self, endpoints: Sequence[EndpointConfig], **params: Any) -> None:
        self.endpoints = list(endpoints)

    async def prepare(self, request: SchedulingRequest) -> SchedulingRequest:
        """Slow per-request work before ``schedule`` (default: none)."""
        return request

    @abstractmethod
    def schedule(self, request: SchedulingRequest) -> SchedulingResult: ...

    def release(self, request: SchedulingRequest, result: SchedulingResult) -> None:  # noqa: B027
        """The request has ended; default: nothing to forget."""

    def first_chunk(  # noqa: B027
        self, request: SchedulingRequest, result: SchedulingResult, ttft_s: float | None
    ) -> None:
        """The answer's first body bytes arrived, ``ttft_s`` after the request was sent (None
        when the answer is not a stream: its first bytes are its last); default: ignore."""

    def stream_end(  # noqa: B027
        self, request: SchedulingRequest, result: SchedulingResult, tpot_s: float
    ) -> None:
        """A successful stream ended; ``tpot_s``: seconds per output token after the first."""

    def report_failure(self, endpoint: EndpointConfig, error: str) -> None:  # noqa: B027
        """Forwarding to ``endpoint`` failed before the response started; default: ignore it.
        Policies that track health should stop routing there until it proves healthy again."""

    async def set_endpoints(self, endpoints: Sequence[EndpointConfig]) -> None:
        """Replace the endpoint set while serving (discovery: pods join and leave).

        Called on the event loop between ``start`` and ``stop``, never concurrently with itself.
        An endpoint is known by its ``address``: new addresses are added, missing ones removed
        (requests already routed there finish, and their ``release`` must still work), and a
        changed config under the same address replaces the old one. Default: adopt the list.
        """
        self.endpoints = list(endpoints)

    async def start(self) -> None:  # noqa: B027
        """Start background work (event subscribers, scrapers); default: none."""

    async def stop(self) -> None:  # noqa: B027
        """Stop what ``start`` started."""

    def explain(self, request: SchedulingRequest) -> dict[str, Any]:
        """Read-only: what the policy knows about this (prepared) request, without routing it."""
        return {}

    def debug_state(self) -> dict[str, Any]:
        return {"endpoints": [e.model_dump() for e in self.endpoints]}
