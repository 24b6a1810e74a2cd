"""Header names the processes agree on, and header hygiene for a proxy hop.

Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded, nor those the server recomputes.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "GENERATION_PATHS",
    "PREFILLER_HEADER",
    "REQUEST_ID_HEADER",
    "forward_headers",
    "response_headers",
]

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
PREFILLER_HEADER = "x-prefiller-host-port"
REQUEST_ID_HEADER = "x-request-id"

# Hop-by-hop headers (RFC 9110 §7.6.1), and Content-Length (each hop recomputes it for the
# body it sends): never forwarded, in either direction.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)
# Besides them, what the next server recomputes (host, encoding) or must not see (proxy auth);
# and on the way back, what our own server writes itself (date, server).
_DROP_REQUEST = _HOP_BY_HOP | {"host", "proxy-authorization", "proxy-connection", "accept-encoding"}
_DROP_RESPONSE = _HOP_BY_HOP | {"date", "server"}


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """An upstream response's headers without the hop-by-hop ones and those the server sets."""
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE}


def forward_headers(
    headers: Mapping[str, str], *, drop: frozenset[str] = frozenset()
) -> dict[str, str]:
    return {
        k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST and k.lower() not in drop
    }
