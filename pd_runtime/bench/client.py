"""One streamed request against an OpenAI-compatible server, timed token by token.

Times are taken with ``time.perf_counter`` on the client: TTFT is from just before the request is
sent to the first chunk with a choice in it; inter-token latencies are the gaps between successive
such chunks (a chunk may carry several tokens, as vLLM's streams can; the gap is then that of the
chunk, like ``vllm bench serve`` records it). A choice counts even when its text is empty: a model
can generate tokens that detokenize to nothing (the tiny test model does), and they are still
tokens; counting only text-carrying chunks would call such an answer a failure. Token counts come from the
stream's final ``usage`` (we send ``stream_options.include_usage``); where a server sends none,
output tokens are the text chunks counted and prompt tokens are unknown (None).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from pd_runtime.common.sse import DONE, SSEDecoder

__all__ = ["RequestRecord", "send"]


@dataclass
class RequestRecord:
    conversation: str
    turn: int
    start_s: float  # since the run's start
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None  # None: success
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tpot_s"] = self.tpot_s
        return data


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    headers: dict[str, str] | None = None,
) -> RequestRecord:
    """POST ``body`` (``stream`` is forced on) to ``url`` and fill ``record``; never raises for
    HTTP or transport failures: they become ``record.error``."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    last = started
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread())[:200].decode(errors="replace")
                record.error = f"http_{response.status_code}: {detail}"
                return record
            done = False
            sse = SSEDecoder()
            async for piece in response.aiter_bytes():
                for data in sse.feed(piece):
                    if data == DONE:
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = f"stream_error: {str(chunk['error'])[:200]}"
                        return record
                    now = time.perf_counter()
                    text = _chunk_text(chunk)
                    if chunk.get("choices"):
                        chunks += 1
                        if record.ttft_s is None:
                            record.ttft_s = now - started
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        record.text += text
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = int(usage.get("completion_tokens") or 0)
                if done:
                    break
            if not done:
                record.error = "stream ended without [DONE]"
                return record
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return record
    record.e2e_s = time.perf_counter() - started
    if record.output_tokens == 0:
        record.output_tokens = chunks
    if record.ttft_s is None and record.output_tokens == 0:
        record.error = "no tokens generated"
    return record
