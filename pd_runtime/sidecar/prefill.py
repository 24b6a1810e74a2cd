"""The prefill call, whatever the protocol: one POST to the chosen prefill worker under a deadline.

The deadline comes from what that prefill should take (:mod:`pd_runtime.sidecar.deadline`); past
it, or on a transport error or an error status, the call is given up (its connection closed, so
vLLM aborts the request) and the caller gets None: the decode worker then prefills locally. Each
answered call teaches the deadline estimator the prefiller's time per prompt token. What goes in
the body and what is read from the answer is the connector's business
(:mod:`pd_runtime.sidecar.connectors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from prometheus_client import Counter, Histogram

from pd_runtime.common.asgi import encode_json
from pd_runtime.common.headers import REQUEST_ID_HEADER
from pd_runtime.common.tracing import Tracing
from pd_runtime.common.upstream import TRANSPORT_ERRORS, UpstreamClient, upstream_timeout
from pd_runtime.sidecar.deadline import PrefillDeadlines, prompt_size

__all__ = ["PrefillHop"]

logger = logging.getLogger("pd_runtime.sidecar")


class PrefillHop:
    """Calls prefill workers for one sidecar; ``client()`` is the process's pooled client (made in
    the lifespan, so looked up per call)."""

    def __init__(
        self,
        client: Callable[[], UpstreamClient],
        deadlines: PrefillDeadlines,
        *,
        read_timeout_s: float,
        connect_timeout_s: float,
        seconds: Histogram,
        deadline_seconds: Histogram,
        deadline_exceeded: Counter,
        tracing: Tracing | None = None,
    ) -> None:
        self.client = client
        self.deadlines = deadlines
        self.timeout = upstream_timeout(read_timeout_s, connect_timeout_s)
        self.seconds = seconds
        self.deadline_seconds = deadline_seconds
        self.deadline_exceeded = deadline_exceeded
        self.tracing = tracing or Tracing()

    def _which(self, headers: dict[str, str]) -> str:
        """Which request a log line is about: its id, and its trace's when tracing is on."""
        return f"request {headers.get(REQUEST_ID_HEADER)}{self.trace_note()}"

    def trace_note(self) -> str:
        """``", trace ID"`` for a log line when tracing is on, else nothing."""
        trace_id = self.tracing.trace_id()
        return f", trace {trace_id}" if trace_id else ""

    async def call(
        self,
        prefiller: str,
        path: str,
        client_body: dict[str, Any],
        prefill_body: dict[str, Any],
        headers: dict[str, str],
    ) -> dict[str, Any] | None:
        """POST ``prefill_body`` to ``http://{prefiller}{path}``; the answer's JSON object (``{}``
        if it is not one), or None when the call failed. ``client_body`` sizes the prompt."""
        size = prompt_size(client_body)
        deadline = self.deadlines.deadline(prefiller, size)
        self.deadline_seconds.observe(deadline.seconds)
        timer = asyncio.timeout(deadline.seconds)
        started = time.perf_counter()
        try:
            # If the client leaves meanwhile (the request's ClientWatch cancels this task), or
            # the deadline passes, the prefill call is cancelled and its connection closed, so
            # the prefill worker aborts the request too.
            async with timer:
                response = await self.client().fetch(
                    "POST",
                    f"http://{prefiller}{path}",
                    content=encode_json(prefill_body),
                    headers=headers,
                    timeout=self.timeout,
                )
        except TRANSPORT_ERRORS as exc:
            if timer.expired():
                self.deadline_exceeded.inc()
                logger.warning(
                    "prefill on %s passed its %.1fs deadline (%s; predicted %.2fs for ~%d "
                    "tokens); cancelled it, decoding locally (%s)",
                    prefiller,
                    deadline.seconds,
                    "no prefill from it yet" if deadline.cold else "learned rate",
                    deadline.predicted_s,
                    deadline.tokens,
                    self._which(headers),
                )
            else:
                logger.warning(
                    "prefill on %s failed (%r); decoding locally (%s)",
                    prefiller,
                    exc,
                    self._which(headers),
                )
            return None
        finally:
            elapsed = time.perf_counter() - started
            self.seconds.observe(elapsed)
        if response.status_code != 200:
            logger.warning(
                "prefill on %s answered %d (%s); decoding locally (%s)",
                prefiller,
                response.status_code,
                response.text[:200],
                self._which(headers),
            )
            return None
        try:
            answer = msgspec.json.decode(response.content)
        except (ValueError, RecursionError):  # not JSON, or not UTF-8
            answer = None
        if not isinstance(answer, dict):
            answer = {}
        prompt_tokens, cached_tokens = _prompt_usage(answer.get("usage"))
        self.deadlines.observe(prefiller, size, elapsed, prompt_tokens, cached_tokens)
        return answer


def _prompt_usage(usage: Any) -> tuple[int | None, int]:
    """``usage.prompt_tokens`` of a prefill answer (None if missing) and its cached tokens."""

    def count(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if not isinstance(usage, dict):
        return None, 0
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return count(usage.get("prompt_tokens")), cached or 0
