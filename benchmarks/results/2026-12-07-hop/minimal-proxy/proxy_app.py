"""The least a streaming proxy hop can do in Python, as ASGI and as RSGI: read the body, POST it
upstream with aiohttp, stream the answer back (no validation, metrics, logging or errors)."""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:13001")
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Content-Type",),
        )
    return _session


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {"content-type": "application/json"}
    async with session().post(UPSTREAM + scope["path"], data=body, headers=headers) as r:
        kind = r.headers.get("content-type", "").encode()
        await send(
            {
                "type": "http.response.start",
                "status": r.status,
                "headers": [(b"content-type", kind)],
            }
        )
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def rsgi(scope: Any, proto: Any) -> None:
    body = await proto()
    headers = {"content-type": "application/json"}
    async with session().post(UPSTREAM + scope.path, data=body, headers=headers) as r:
        kind = r.headers.get("content-type", "")
        transport = proto.response_stream(status=r.status, headers=[("content-type", kind)])
        async for chunk in r.content.iter_any():
            await transport.send_bytes(chunk)
