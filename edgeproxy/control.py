"""The control process: metrics and health on `[metrics] listen` (admin API comes later).

It serves no customer traffic, so a slow scrape never delays a beacon. `/metrics` sums
every worker's values from the multiprocess directory; `/readyz` is 200 only when every
worker reports its listeners up and its certificates indexed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from edgeproxy.config import Settings


def _collect() -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def build_app(settings: Settings) -> web.Application:
    expected = settings.server.worker_count

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(lambda: generate_latest(_collect()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(_: web.Request) -> web.Response:
        registry = await asyncio.to_thread(_collect)
        ready = registry.get_sample_value("edgeproxy_workers_ready") or 0
        loaded = registry.get_sample_value("edgeproxy_certificates_loaded") or 0
        doc = {"workers_ready": int(ready), "workers": expected, "certificates": int(loaded)}
        if ready >= expected:
            return web.json_response({"status": "ready", **doc})
        return web.json_response({"status": "starting", **doc}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_control(
    settings: Settings, metrics_sock: socket.socket | None, parent_pid: int
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    if metrics_sock is not None:
        await web.SockSite(runner, metrics_sock).start()

    def check_parent() -> None:
        if os.getppid() != parent_pid:
            stop.set()
        else:
            loop.call_later(1.0, check_parent)

    loop.call_later(1.0, check_parent)
    await stop.wait()
    await runner.cleanup()


def run_control(settings: Settings, metrics_sock: socket.socket | None, parent_pid: int) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_control(settings, metrics_sock, parent_pid))
    return 0
