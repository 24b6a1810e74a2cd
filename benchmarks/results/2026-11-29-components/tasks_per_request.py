"""asyncio tasks created per request by one hop, in process: a counting task factory on the
server's loop, 200 streamed requests from a client thread after 20 to warm up, fake upstreams
(``tests.servers.FakeEngine``) on their own loops. Run from a checkout, against that checkout:

    cd TREE && PYTHONPATH=TREE python benchmarks/results/2026-11-29-components/tasks_per_request.py
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn

from tests.servers import FakeEngine, free_port, serve

created = {"n": 0}


def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
    created["n"] += 1
    return asyncio.Task(coro, loop=loop, **kw)


def run(app: Any, drive: Callable[[httpx.Client, str, int], None]) -> float:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")
    server = uvicorn.Server(config)
    result: dict[str, float] = {}

    def client() -> None:
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client() as c:
            drive(c, url, 20)
            before = created["n"]
            drive(c, url, 200)
            result["per_request"] = (created["n"] - before) / 200
        server.should_exit = True

    thread = threading.Thread(target=client)
    thread.start()

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(factory)  # type: ignore[arg-type]
        await server.serve()

    asyncio.run(main())
    thread.join()
    return result["per_request"]


BODY = {"model": "tiny", "prompt": "hello there", "max_tokens": 3, "stream": True}


def drive_with(headers: dict[str, str]) -> Callable[[httpx.Client, str, int], None]:
    def drive(c: httpx.Client, url: str, n: int) -> None:
        for _ in range(n):
            with c.stream("POST", f"{url}/v1/completions", json=BODY, headers=headers) as r:
                assert r.status_code == 200, r.read()
                for _ in r.iter_raw():
                    pass

    return drive


def main() -> None:
    from pd_runtime.config import CoordinatorConfig
    from pd_runtime.coordinator.app import create_app as coordinator_app
    from pd_runtime.sidecar.app import SidecarSettings
    from pd_runtime.sidecar.app import create_app as sidecar_app

    prefill, decode = FakeEngine("prefill"), FakeEngine("decode")
    decode.chunk_delay_s = prefill.chunk_delay_s = 0.0
    out = {}
    with serve(prefill.app()) as p_url, serve(decode.app()) as d_url:
        pre = p_url.removeprefix("http://")
        settings = SidecarSettings(decode_url=d_url, allowed_prefillers=frozenset({pre}))
        out["sidecar direct"] = run(sidecar_app(settings), drive_with({}))
        pd = drive_with({"x-prefiller-host-port": pre})
        out["sidecar P/D"] = run(sidecar_app(settings), pd)
        endpoint = {"name": "d", "role": "decode", "address": "127.0.0.1:9", "url": d_url}
        cfg = CoordinatorConfig.model_validate({"models": ["tiny"], "endpoints": [endpoint]})
        out["coordinator rr"] = run(coordinator_app(cfg), drive_with({}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
