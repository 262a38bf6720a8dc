"""Worker side of hot reload: follow the served folder the registry publishes into.

Each change is one atomic rename of `<domain>.pem`; the store swaps that domain's context
(or drops it). The watch is inotify on the event loop (see inotify.py); a rescan every
`rescan_interval` catches anything missed. This module imports nothing of the validation
stack (cryptography, watchfiles): at 100k domains a worker is ~18 MB smaller for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from edgeproxy.inotify import RESCAN, FolderWatch
from edgeproxy.tls.store import SERVED_SUFFIX, CertStore

SYNC_TICK = 0.1
"""Workers report this often how current they are (the admin API's preparing -> active)."""


async def watch_served(
    store: CertStore,
    stop: asyncio.Event,
    *,
    rescan_interval: float,
    on_change: Callable[[], None],
    on_synced: Callable[[float], None] = lambda _t: None,
    watch: FolderWatch | None = None,
) -> None:
    """Worker side: follow the served folder the registry publishes into, from the event loop
    (inotify, see inotify.py), until `stop` is set.

    `on_synced(t)` is told that everything published before `t` is served: the kernel queues
    a rename's event inside the rename, so once the queue is read empty after `t`, every
    publish before `t` has been applied.

    `watch`: one the caller set up before its own first scan of the folder (that scan then
    needs no repeat: at 100k domains each is ~0.3 s of a worker's start).
    """
    loop = asyncio.get_running_loop()
    if watch is None:
        watch = FolderWatch(store.dir)
        # The watch is in place before this scan: anything published from now raises an event.
        store.scan()
        on_change()

    def apply() -> None:
        started = time.time()
        changed = watch.read()
        if changed is RESCAN:
            with contextlib.suppress(OSError):
                watch.rewatch()  # the folder was replaced: watch the new one
            store.scan()
            on_change()
        else:
            assert isinstance(changed, set)
            names = [
                n[: -len(SERVED_SUFFIX)]
                for n in changed
                if n.endswith(SERVED_SUFFIX) and not n.startswith(".")
            ]
            for name in names:
                store.refresh(name)
            if names:
                on_change()
        on_synced(started - 0.001)

    timers: list[asyncio.TimerHandle] = []

    def every(interval: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            fn()
            timers[i] = loop.call_later(interval, run)

        i = len(timers)
        timers.append(loop.call_later(interval, run))

    def rescan() -> None:
        store.scan()
        on_change()

    loop.add_reader(watch.fileno(), apply)
    every(SYNC_TICK, apply)
    every(rescan_interval, rescan)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(watch.fileno())
        for timer in timers:
            timer.cancel()
        watch.close()
