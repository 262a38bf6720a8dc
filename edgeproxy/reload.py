"""Hot reload, control side: the loop that keeps the certificate registry current.

Control process (`run_registry`):
1. load the index of earlier validations and reconcile it with the source (only changed
   domains are validated, so a restart with 100k unchanged domains is a listing);
2. then, for every batch of changed domains the source reports, revalidate just those, off
   the event loop, one domain at a time;
3. a read that races a write is retried shortly (up to ~2 s), and a full rescan every
   `certs.rescan_interval` seconds catches anything the watcher missed.

Worker processes follow what the registry publishes with tls/follow.py (kept apart so a
worker never imports the validation stack). Neither ever restarts a process.
"""

from __future__ import annotations

import asyncio
import gc
import time

from edgeproxy.asyncio_utils import create_task
from edgeproxy.logging import reload_log
from edgeproxy.tls.registry import CertRegistry
from edgeproxy.tls.source import RESCAN_ALL, BundleSource

INFLIGHT_RETRIES = 20
INFLIGHT_DELAY = 0.1
BATCH = 256
"""Domains refreshed per trip off the event loop, made durable by one filesystem sync (see
CertRegistry.refresh_many). A stop waits for one batch at most (~0.2 s, and that sync)."""


RECHECK_AFTER = (0.3, 1.5)
"""A rejected bundle is looked at again after these delays: inotify can miss the writes
that complete a file in a folder created an instant earlier (before its watch exists)."""


SAVE_DELAY = 2.0
"""The index is rewritten at most this often: at 100k domains it is tens of MB."""
_saving: set[int] = set()


def _save_soon(registry: CertRegistry) -> None:
    if id(registry) in _saving:
        return
    _saving.add(id(registry))

    async def save() -> None:
        try:
            await asyncio.sleep(SAVE_DELAY)
        finally:
            _saving.discard(id(registry))
            if registry.dirty:
                try:
                    await asyncio.to_thread(registry.save)
                except OSError as exc:  # the served files stay served; the index waits
                    registry.dirty = True
                    reload_log.error("could not save %s: %s", registry.index_file, exc)

    create_task(save(), name="edgeproxy.save-index")


async def _refresh(registry: CertRegistry, domains: set[str], *, recheck: bool = True) -> None:
    rejected = set()
    ordered = sorted(domains)
    for start in range(0, len(ordered), BATCH):
        batch = ordered[start : start + BATCH]
        try:
            outcomes = await asyncio.to_thread(registry.refresh_many, batch)
        except Exception:  # a bug must not end hot reload: the next rescan tries again
            reload_log.exception("refreshing %d domains failed", len(batch))
            continue
        for domain, outcome in zip(batch, outcomes, strict=True):
            for _ in range(INFLIGHT_RETRIES if outcome == "inflight" else 0):
                await asyncio.sleep(INFLIGHT_DELAY)
                outcome = await asyncio.to_thread(registry.refresh, domain)
                if outcome != "inflight":
                    break
            if outcome == "inflight":
                reload_log.warning(
                    "%s kept changing while being read; will retry on the next change or rescan",
                    domain,
                    extra={"domain": domain},
                )
            elif outcome == "rejected":
                rejected.add(domain)
    if registry.dirty:
        _save_soon(registry)
    if registry.on_change is not None:
        registry.on_change()
    if rejected and recheck:
        create_task(_recheck(registry, rejected), name="edgeproxy.recheck")


async def _recheck(registry: CertRegistry, domains: set[str]) -> None:
    for delay in RECHECK_AFTER:
        await asyncio.sleep(delay)
        await _refresh(registry, domains, recheck=False)  # an unchanged version costs a read


async def sync(registry: CertRegistry) -> None:
    """Reconcile the registry with the whole source (start, SIGHUP, periodic rescan)."""
    await _refresh(registry, await asyncio.to_thread(registry.changed))


async def run_registry(
    registry: CertRegistry, source: BundleSource, stop: asyncio.Event, rescan_interval: float
) -> None:
    # 1. earlier validations, then everything that changed since
    await asyncio.to_thread(registry.open)
    gc.freeze()  # the index's entries live until replaced: keep them out of every collection
    # A restart serves what the last run validated at once: those bundles are in the served
    # folder. What changed on disk while the edge was down is found by the sync below, like
    # any change (at 100k domains the sync's stat calls take seconds).
    registry.serving = bool(registry.entries)
    started = time.monotonic()
    await sync(registry)
    registry.serving = registry.synced = True
    reload_log.info(
        "certificates synced",
        extra={"domains": len(registry.entries), "seconds": round(time.monotonic() - started, 3)},
    )

    async def rescans() -> None:
        # 3. the safety net for events the watcher missed
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), rescan_interval)
            except TimeoutError:
                await sync(registry)

    rescan_task = create_task(rescans(), name="edgeproxy.rescan")
    try:
        # 2. changed domains only
        async for domains in source.changes(stop):
            if RESCAN_ALL in domains:
                await sync(registry)
            else:
                await _refresh(registry, domains)
    finally:
        rescan_task.cancel()
