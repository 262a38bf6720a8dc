"""The control process: certificate registry, admin API, metrics and health.

It serves no customer traffic, so validation work or a slow scrape never delays a beacon.
- The certificate registry lives here: every change is validated once and published to
  the served folder the workers follow (see tls/registry.py, reload.py).
- `/metrics` sums every worker's values from the multiprocess directory and adds the
  certificate metrics the registry owns.
- `/readyz` is 200 only when every worker reports its listeners up and serves every
  certificate validated so far (at a restart: the last run's, at once; what changed on disk
  while the edge was down follows within seconds, `certificates_synced` says when).
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from edgeproxy.asyncio_utils import create_task, watch_parent
from edgeproxy.config import Settings
from edgeproxy.metrics import CertCollector, CertRow
from edgeproxy.notify import ExpiryNotifier, run_notifier
from edgeproxy.reload import run_registry, sync
from edgeproxy.tls.bundle import trust_store
from edgeproxy.tls.registry import CertRegistry
from edgeproxy.tls.source import DirectorySource


def make_registry(settings: Settings) -> CertRegistry:
    certs = settings.certs
    source = DirectorySource(
        certs.dir,
        step_ms=certs.reload_step_ms,
        debounce_ms=certs.reload_debounce_ms,
        force_polling=certs.force_polling,
        ignore=certs.state,
    )
    return CertRegistry(source, certs.state, lambda: trust_store(certs.trust_bundle))


def _cert_rows(registry: CertRegistry) -> tuple[list[CertRow], dict[str, int], float | None]:
    now = time.time()
    rows = [
        (e.domain, e.served.not_after if e.served else None, e.state(now).value)
        for e in registry.snapshot()
    ]
    return rows, dict(registry.counts), registry.last_success


def build_app(settings: Settings, registry: CertRegistry) -> web.Application:
    expected = settings.server.worker_count
    certs = CertCollector(lambda: _cert_rows(registry))

    def collect() -> CollectorRegistry:
        scrape = _workers()
        scrape.register(certs)
        return scrape

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(lambda: generate_latest(collect()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(_: web.Request) -> web.Response:
        gauges = await asyncio.to_thread(_worker_gauges)
        ready = gauges.get("edgeproxy_workers_ready", 0)
        # Every worker must have picked up what the registry published.
        loaded = gauges.get("edgeproxy_certificates_loaded", 0)
        served = registry.served_count()
        doc = {
            "workers_ready": int(ready),
            "workers": expected,
            "certificates_synced": registry.synced,
            "certificates": served,
            "certificates_in_every_worker": int(loaded),
        }
        if ready >= expected and registry.serving and loaded >= served:
            return web.json_response({"status": "ready", **doc})
        return web.json_response({"status": "starting", **doc}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _workers() -> CollectorRegistry:
    """The values every worker wrote to the multiprocess directory."""
    scrape = CollectorRegistry()
    MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    return scrape


def _worker_gauges() -> dict[str, float]:
    """The workers' unlabelled live gauges (readiness, certificates loaded, synced time).

    Read from the live gauges' files alone: probes come every few seconds, and a full scrape
    also parses every worker's histograms (~4 ms against ~0.15 ms, and two scrapes per
    probe before, all holding the GIL a first start's validation needs).
    """
    files = glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "gauge_live*.db"))
    return {
        s.name: s.value
        for metric in MultiProcessCollector.merge(files, accumulate=False)  # type: ignore[no-untyped-call]
        for s in metric.samples
        if not s.labels
    }


def _synced_at() -> float:
    """Everything published before this time is served by every worker (0: unknown)."""
    return _worker_gauges().get("edgeproxy_served_synced_timestamp_seconds", 0.0)


async def serve_control(
    settings: Settings,
    metrics_sock: socket.socket | None,
    admin_sock: socket.socket | None,
    parent_pid: int,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = make_registry(settings)
    loop.add_signal_handler(signal.SIGHUP, lambda: create_task(sync(registry), name="sighup"))
    runner = web.AppRunner(build_app(settings, registry), access_log=None, handle_signals=False)
    await runner.setup()
    if metrics_sock is not None:
        await web.SockSite(runner, metrics_sock).start()
    admin_runner = None
    if admin_sock is not None:
        from edgeproxy.admin.api import build_admin_app
        from edgeproxy.doctor import diagnose

        async def check(domain: str) -> dict[str, Any]:
            return await diagnose(settings, registry, domain)

        admin_runner = web.AppRunner(
            build_admin_app(settings, registry, _synced_at, check),
            access_log=None,
            handle_signals=False,
        )
        await admin_runner.setup()
        await web.SockSite(admin_runner, admin_sock).start()
    certs = settings.certs
    reloader = create_task(
        run_registry(registry, registry.source, stop, certs.rescan_interval), name="registry"
    )
    nudge = asyncio.Event()
    registry.on_change = nudge.set
    notifier = ExpiryNotifier(settings.notify, certs.state / "notified.json")
    reminders = create_task(
        run_notifier(
            notifier,
            registry.snapshot,
            lambda: registry.synced,  # never remind from the last run's view
            stop,
            nudge,
            settings.notify.check_interval,
        ),
        name="reminders",
    )

    watch_parent(loop, parent_pid, stop)
    await stop.wait()
    reloader.cancel()
    reminders.cancel()
    if registry.dirty:
        await asyncio.to_thread(registry.save)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()


def run_control(
    settings: Settings,
    metrics_sock: socket.socket | None,
    admin_sock: socket.socket | None,
    parent_pid: int,
) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_control(settings, metrics_sock, admin_sock, parent_pid))
    return 0
