"""The seam between the sidecar's proxying and one KV-transfer protocol.

The sidecar (:mod:`pd_runtime.sidecar.app`) owns everything protocol-neutral: the allow-list of
prefillers, watching the client, the prefill call's deadline and metrics
(:mod:`pd_runtime.sidecar.prefill`), the decode call and streaming the answer back. A connector
owns what a protocol says in the bodies:

* :meth:`Connector.direct_content`: a request with no prefiller goes to the decode worker as is,
  except for any transfer fields the *client* sent (never trusted: they could aim the decode
  worker's KV pull at an arbitrary host);
* :meth:`Connector.disaggregate`: the prefill hop. It builds the prefill worker's body, calls
  ``prefill`` (which returns the prefill worker's JSON answer, or None when the call failed, timed
  out or answered an error, already logged and counted), and returns the decode worker's body.
  It must not raise for a failed prefill: the decode worker then prefills locally
  (``transferred=False``, counted as a fallback).

Bodies are dicts from the client's JSON; a connector builds new top-level dicts and never mutates
the client's (nested values may be shared). Connectors are registered by name in
:data:`CONNECTORS` (lazily, ``"module:attr"``); the sidecar's ``--connector`` choices come from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pd_runtime.common.registry import Registry

__all__ = ["CONNECTORS", "Connector", "Disaggregated", "PrefillCall"]

#: Sends a prefill body to the chosen prefill worker; its JSON answer, or None on failure.
PrefillCall = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class Disaggregated:
    """What the prefill hop produced: the decode worker's body (the client's own dict, unchanged,
    when there was nothing to add or remove) and whether KV was handed over."""

    decode_body: dict[str, Any]
    transferred: bool


class Connector(ABC):
    """One KV-transfer protocol (stateless; one instance per sidecar)."""

    name: ClassVar[str]

    @abstractmethod
    def direct_content(self, raw_body: bytes) -> bytes:
        """The bytes for the decode worker when no prefiller is asked for: ``raw_body`` itself
        unless it carries client-sent transfer fields. Raises
        :class:`~pd_runtime.errors.BadRequestError` for a body that is not a JSON object."""

    @abstractmethod
    async def disaggregate(self, body: dict[str, Any], prefill: PrefillCall) -> Disaggregated:
        """Run the prefill hop for ``body`` through ``prefill``; never raises for its failure."""


CONNECTORS: Registry[Connector] = Registry("KV connector")
CONNECTORS.register("nixl", "pd_runtime.sidecar.connectors.nixl:NixlConnector")
