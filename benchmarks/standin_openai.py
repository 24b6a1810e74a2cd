"""A fast *stand-in* OpenAI server for component benchmarks: no engine, fixed timing.

Named as a stand-in: it is not vLLM. It answers ``/v1/completions`` and ``/v1/chat/completions``
like vLLM's OpenAI server, so that what a proxy in front of it adds (coordinator, sidecar,
vllm-router) is not hidden by the engine's own time. Behaviour per request:

* ``max_tokens`` (default 16) tokens; the first after ``ttft_ms``, then one every ``itl_ms``
  (both 0 by default: chunks are written back to back, each its own write);
* ``stream: true``: SSE ``data: {...}`` chunks, one token each, then ``data: [DONE]``;
* otherwise one JSON body with ``kv_transfer_params`` (as a vLLM prefill worker returns with
  ``do_remote_decode``), so that P/D proxies (our sidecar, vllm-router's P/D mode) can chain a
  prefill and a decode call through it;
* ``/health``, ``/v1/models`` and ``/metrics`` (vLLM's three load gauges at zero, for scrapers).

aiohttp's low-level web server, one process, any number of ports (e.g. a "decode" and a
"prefill" port). Run: ``python benchmarks/standin_openai.py --port 13001 --port 13002``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["StandIn", "serve_forever", "start"]

METRICS = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="standin"} 0.0\n'
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{model_name="standin"} 0.0\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{model_name="standin"} 0.0\n'
)


@dataclass
class StandIn:
    """Timing of the stand-in; ``requests`` counts the generation requests it answered."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    default_tokens: int = 16
    model: str = "standin"
    requests: int = 0
    #: generation requests answered, by (local port, streamed or not)
    counts: dict[tuple[int, bool], int] = field(default_factory=dict)

    async def _pause(self, ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.requests += 1
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        key = (int(sockname[1]) if sockname else 0, bool(body.get("stream")))
        self.counts[key] = self.counts.get(key, 0) + 1
        chat = request.path.endswith("/chat/completions")
        raw = body.get("max_tokens", body.get("max_completion_tokens"))
        n = self.default_tokens if raw is None else max(1, int(raw))
        rid = f"standin-{self.requests}"
        if not body.get("stream"):
            await self._pause(self.ttft_ms + self.itl_ms * (n - 1))
            text = "".join(f"t{i} " for i in range(n))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": self.model,
                    "choices": [{**choice, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
                    "kv_transfer_params": {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_engine_id": "standin-engine",
                        "remote_block_ids": [0, 1],
                        "remote_host": "127.0.0.1",
                        "remote_port": 5600,
                        "remote_request_id": rid,
                        "tp_size": 1,
                    },
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await self._pause(self.ttft_ms)
        for i in range(n):
            if i:
                await self._pause(self.itl_ms)
            if chat:
                delta = {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
                obj = "chat.completion.chunk"
            else:
                delta = {"index": 0, "text": f"t{i} ", "finish_reason": None}
                obj = "text_completion"
            chunk = {"id": rid, "object": obj, "model": self.model, "choices": [delta]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, _: web.Request) -> web.Response:
        data = [{"id": self.model, "object": "model", "owned_by": "standin", "max_model_len": 4096}]
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, _: web.Request) -> web.Response:
        lines = [METRICS, "# TYPE standin_requests_total counter\n"]
        for (port, stream), n in sorted(self.counts.items()):
            lines.append(
                f'standin_requests_total{{port="{port}",stream="{str(stream).lower()}"}} {n}\n'
            )
        return web.Response(text="".join(lines), content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app


async def start(standin: StandIn, host: str, ports: list[int]) -> web.AppRunner:
    """Serve ``standin`` on every port; the caller awaits ``runner.cleanup()`` to stop."""
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    return runner


async def serve_forever(standin: StandIn, host: str, ports: list[int]) -> None:
    runner = await start(standin, host, ports)
    print(f"stand-in OpenAI server on {host}:{ports} ({standin})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=16, help="when the request gives no max_tokens")
    args = ap.parse_args()
    standin = StandIn(args.ttft_ms, args.itl_ms, args.tokens)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(standin, args.host, args.port))


if __name__ == "__main__":
    main()
