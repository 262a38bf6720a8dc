"""Where certificate bundles come from: the one small interface the registry reads.

A source answers three questions: which domains exist and at which version (cheap, no
parsing), what are one domain's bytes now, and which domains may have changed (an async
stream). The folder source is the first; a distributed store (etcd) will implement the same
three methods, so nothing downstream assumes the bytes came from a local file.

Rules for the folder source:
- `<dir>/<domain>/fullchain.pem` + `privkey.pem`, symlinks followed (the Kubernetes secret
  layout, files linked through an atomically swapped `..data`, included).
- A version is the (device, inode, mtime, size) of both files after following links, so a
  rewrite, a rename over, or a `..data` swap all change it.
- A domain is removed when its folder is. An empty folder is a registered domain awaiting
  its certificate; a folder with one file of the two is a write in progress. Either way the
  last good bundle, if any, stays served.
- A read that races a write (the version moves while reading) raises `InFlight`; the next
  change event, or the retry the registry schedules, reads it again. A half-written file is
  never handed over as if it were complete.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

from watchfiles import Change, watch

from edgeproxy.logging import reload_log
from edgeproxy.tls.bundle import BundleBytes
from edgeproxy.tls.store import is_domain_name

FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"
EMPTY = "empty"
"""The version of a registered domain whose folder has no files yet."""
RESCAN_ALL = "*"
"""Yielded by `changes()` when anything may have changed (a swapped top-level link)."""


class InFlight(Exception):
    """The bundle changed while it was being read; read it again shortly."""


class BundleSource(Protocol):
    def versions(self) -> Iterator[tuple[str, str]]:
        """Every domain the source holds, with its current version, one at a time (at 100k
        domains a table of them all was ~30 MB the control process kept as heap)."""
        ...

    def version(self, domain: str) -> str | None:
        """One domain's current version (None when the source doesn't hold it)."""
        ...

    def read(self, domain: str) -> BundleBytes | None:
        """The domain's bundle now, or None when it is gone. May raise InFlight."""
        ...

    def changes(self, stop: asyncio.Event) -> AsyncIterator[set[str]]:
        """Sets of domains that may have changed, until `stop` is set."""
        ...


class DirectorySource:
    def __init__(
        self,
        root: Path,
        *,
        step_ms: int = 20,
        debounce_ms: int = 200,
        force_polling: bool = False,
        ignore: Path | None = None,
    ) -> None:
        """
        Parameters:
            root: the certificates folder.
            step_ms: quiet time after the last file event before changes are reported.
            debounce_ms: longest time events are grouped while writes keep coming.
            force_polling: poll instead of inotify (network filesystems, no inotify).
            ignore: a folder below `root` whose changes are not bundles (the edge's state).
        """
        self.root = root.absolute()
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        self.force_polling = force_polling
        self.ignore = ignore.absolute() if ignore is not None else None

    def _version(self, folder: Path | str) -> str | None:
        """The bundle's version; EMPTY for a folder with neither file; None otherwise."""
        try:
            # String paths: at 100k domains, Path objects were a third of a full rescan.
            a = os.stat(f"{folder}/{FULLCHAIN}")
            b = os.stat(f"{folder}/{PRIVKEY}")
        except OSError:
            folder = Path(folder)
            if not (folder / FULLCHAIN).exists() and not (folder / PRIVKEY).exists():
                return EMPTY if folder.is_dir() else None
            return None
        return (
            f"{a.st_dev}:{a.st_ino}:{a.st_mtime_ns}:{a.st_size}/"
            f"{b.st_dev}:{b.st_ino}:{b.st_mtime_ns}:{b.st_size}"
        )

    def version(self, domain: str) -> str | None:
        return self._version(self.root / domain) if is_domain_name(domain) else None

    def versions(self) -> Iterator[tuple[str, str]]:
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not is_domain_name(entry.name):
                        continue
                    version = self._version(entry.path)
                    if version is not None:
                        yield entry.name, version
        except FileNotFoundError:
            return

    def read(self, domain: str) -> BundleBytes | None:
        folder = self.root / domain
        before = self._version(folder)
        if before is None:
            if folder.is_dir():
                # One file without the other: a write in progress, not a removal.
                raise InFlight(f"{folder} is missing {FULLCHAIN} or {PRIVKEY}")
            return None
        if before == EMPTY:
            return BundleBytes(domain, b"", b"", origin=str(folder), version=EMPTY)
        try:
            fullchain = (folder / FULLCHAIN).read_bytes()
            privkey = (folder / PRIVKEY).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InFlight(str(exc)) from exc
        if self._version(folder) != before:
            raise InFlight(f"{folder} changed while it was read")
        return BundleBytes(domain, fullchain, privkey, origin=str(folder), version=before)

    def _domain_of(self, path: str) -> str | None:
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return RESCAN_ALL
        if not rel.parts:
            return RESCAN_ALL
        first = rel.parts[0]
        if first.startswith(".."):
            return RESCAN_ALL  # a Kubernetes-style swap of the whole folder
        if first.startswith("."):
            return None
        return first if is_domain_name(first) else None

    def _keep(self, _change: Change, path: str) -> bool:
        return self.ignore is None or not path.startswith(str(self.ignore))

    async def changes(self, stop: asyncio.Event) -> AsyncIterator[set[str]]:
        """Watch the folder tree from a thread of its own.

        Setting up a recursive inotify watch costs a syscall per folder: seconds at 100k
        domains, which must not freeze the event loop (metrics, admin, readiness). Once the
        watch is in place, RESCAN_ALL is yielded so that anything written while it was
        being set up is picked up too.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[set[str] | None] = asyncio.Queue()
        halt = threading.Event()

        def post(item: set[str] | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the loop is gone (shutting down): nobody is listening any more

        def run() -> None:
            ready = False
            try:
                for batch in watch(
                    self.root,
                    watch_filter=self._keep,
                    stop_event=halt,
                    step=self.step_ms,
                    debounce=self.debounce_ms,
                    force_polling=self.force_polling or None,
                    poll_delay_ms=300,
                    recursive=True,
                    rust_timeout=1000,
                    yield_on_timeout=True,
                    raise_interrupt=False,
                ):
                    if not ready:
                        ready = True
                        post({RESCAN_ALL})
                    domains = {d for _, p in batch if (d := self._domain_of(p)) is not None}
                    if domains:
                        post(domains)
            except Exception:  # the rescan keeps reloads going; say why the watch stopped
                reload_log.exception("watching %s failed; relying on periodic rescans", self.root)
            finally:
                post(None)

        thread = threading.Thread(target=run, name="edgeproxy-watch-certs", daemon=True)
        thread.start()
        stopped = loop.create_task(stop.wait())
        try:
            while True:
                getter = loop.create_task(queue.get())
                await asyncio.wait([getter, stopped], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                item = getter.result()
                if item is None:
                    await stopped  # the watcher died: the periodic rescan carries on
                    return
                yield item
        finally:
            halt.set()
            stopped.cancel()
