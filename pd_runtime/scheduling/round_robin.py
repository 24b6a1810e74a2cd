"""Round-robin over decode endpoints and, independently, over prefill endpoints.

The baseline policy: no signals, no scores (``scores`` is ``None``). Always disaggregates when a
prefill endpoint exists (``disaggregate: false`` turns that off).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import NoEndpointError
from pd_runtime.scheduling.base import Scheduler, SchedulingRequest, SchedulingResult

__all__ = ["RoundRobinScheduler"]


class RoundRobinScheduler(Scheduler):
    def __init__(
        self, endpoints: Sequence[EndpointConfig], *, disaggregate: bool = True, **params: Any
    ) -> None:
        super().__init__(endpoints, **params)
        self.disaggregate = disaggregate
        self._split()
        self._decode_turn = itertools.count()
        self._prefill_turn = itertools.count()

    def _split(self) -> None:
        self.decode = [e for e in self.endpoints if e.role == "decode"]
        self.prefill = (
            [e for e in self.endpoints if e.role == "prefill"] if self.disaggregate else []
        )

    async def set_endpoints(self, endpoints: Sequence[EndpointConfig]) -> None:
        # Lists are replaced whole, never mutated: schedule() never sees a half-updated one.
        await super().set_endpoints(endpoints)
        self._split()

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        if not self.decode:
            raise NoEndpointError("no decode endpoint is configured or discovered")
        decode = self.decode[next(self._decode_turn) % len(self.decode)]
        eligible = request.eligible
        if decode.address in request.exclude or (
            eligible is not None and decode.address not in eligible
        ):
            # Failover (or an adapter's holders): the next endpoint in turn that may serve it.
            untried = [
                e
                for e in self.decode
                if e.address not in request.exclude and (eligible is None or e.address in eligible)
            ]
            if not untried:
                raise NoEndpointError("no untried decode endpoint can serve this request")
            start = self.decode.index(decode)
            decode = min(untried, key=lambda e: (self.decode.index(e) - start) % len(self.decode))
        prefills = self.prefill
        if eligible is not None:
            prefills = [e for e in prefills if e.address in eligible]
        prefill = prefills[next(self._prefill_turn) % len(prefills)] if prefills else None
        return SchedulingResult(decode=decode, prefill=prefill, scores=None)
