"""CertRegistry: validates what a source holds and publishes what the workers may serve.

Rules:
- One registry per edge (in the control process), so each change is validated once and
  each metric and reminder has one author, however many workers there are.
- A bundle that passes validation is written to `<state>/served/<domain>.pem` (key + chain,
  mode 0600, temp file + fsync + rename): that folder is all the workers ever read.
- A bundle that fails never replaces the served one: the last good bundle stays served, the
  domain is flagged `invalid` with the reasons, and `rejected` is counted.
- A domain gone from the source is removed from the served folder (`removed`).
- `<state>/index.json` remembers which source version was validated with what result, so a
  restart re-validates only what changed while the edge was down.

Theory of operation: `changed()` compares the source's cheap version listing with the index;
`refresh(domain)` reads, validates and publishes one domain; `refresh_many(domains)` does a
batch (a start, a rescan) and makes it durable with one filesystem sync. All run in a thread
(they do file I/O and RSA work); a lock guards the entries they share with the metrics
collector.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509

from edgeproxy.logging import reload_log
from edgeproxy.tls.bundle import EXPIRY_WARNING_DAYS, KeyMismatch, Verdict, validate_bundle
from edgeproxy.tls.source import EMPTY, BundleSource, InFlight
from edgeproxy.tls.store import SERVED_SUFFIX

INDEX_VERSION = 2
"""v2: a header line, then one JSON row per line (v1, one document, is still read). Read a
line at a time, at 100k domains the control process is ~40 MB smaller than after parsing
one document (whose transient lists fragmented the heap) and starts faster."""


MISMATCH_GRACE = 1.0
"""Seconds a certificate/key mismatch is taken for a two-file update in progress."""


class CertState(Enum):
    AWAITING = "awaiting_certificate"
    ACTIVE = "active"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    INVALID = "invalid"


# Slotted, with tuples: at 100k domains a dict and two lists per object were ~40% of the
# control process's memory.
@dataclass(slots=True)
class Served:
    """What is being served for a domain (never the key)."""

    version: str
    not_after: float
    cert_sha256: str
    spki_sha256: str
    validated_at: float
    warnings: tuple[str, ...] = ()

    def row(self) -> list[object]:
        return [
            self.version,
            self.not_after,
            self.cert_sha256,
            self.spki_sha256,
            self.validated_at,
            list(self.warnings),
        ]


@dataclass(slots=True)
class Entry:
    domain: str
    served: Served | None = None
    rejected_version: str | None = None
    """The source version that failed validation (not retried until it changes)."""
    errors: tuple[str, ...] = ()
    updated_at: float = 0.0

    def row(self) -> list[object]:
        served = self.served.row() if self.served is not None else None
        return [self.domain, served, self.rejected_version, list(self.errors), self.updated_at]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        domain, served, rejected, errors, updated_at = row
        if served is not None:
            version, not_after, cert, spki, validated_at, warnings = served
            served = Served(version, not_after, cert, spki, validated_at, tuple(warnings))
        return cls(domain, served, rejected, tuple(errors), updated_at)

    @classmethod
    def from_v1(cls, domain: str, raw: dict[str, Any]) -> Entry:
        served = raw.get("served")
        if served:
            served = Served(**{**served, "warnings": tuple(served.get("warnings", ()))})
        return cls(
            domain,
            served or None,
            raw.get("rejected_version"),
            tuple(raw.get("errors", ())),
            raw.get("updated_at", 0.0),
        )

    def state(self, now: float) -> CertState:
        if self.errors:
            return CertState.INVALID
        if self.served is None:
            return CertState.AWAITING
        left = self.served.not_after - now
        if left <= 0:
            return CertState.EXPIRED
        if left < EXPIRY_WARNING_DAYS * 86400:
            return CertState.EXPIRING
        return CertState.ACTIVE


class CertRegistry:
    def __init__(
        self,
        source: BundleSource,
        state_dir: Path,
        roots: Callable[[], tuple[x509.Certificate, ...]],
    ) -> None:
        self.source = source
        self.state_dir = state_dir
        self.served_dir = state_dir / "served"
        self.index_file = state_dir / "index.json"
        self._roots = roots
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        """One refresh at a time: the watcher and the admin API may both ask for one."""
        self.entries: dict[str, Entry] = {}
        self.key_users: dict[str, tuple[str, ...]] = {}
        """Public-key SHA-256 -> domains serving that key (the key-reuse rule's index)."""
        self.counts = {"loaded": 0, "rejected": 0, "removed": 0, "failed": 0}
        self.last_success: float | None = None
        self.serving = False
        """Every domain validated so far is published: at a restart, as soon as the index of
        the last run is loaded (its bundles are in the served folder); at a first start,
        after the first sync."""
        self.synced = False
        """The source has been reconciled with the index at least once since start."""
        self.dirty = False
        self._served_count: int | None = None
        self._mismatch_since: dict[str, float] = {}
        self.on_change: Callable[[], None] | None = None
        """Called (on the event loop) after a batch of changes was applied."""

    # --- persistence ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the state folders and load the index of earlier validations."""
        for d in (self.state_dir, self.served_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        # No collections while 100k entries are made: 0.40 s instead of 0.67 s.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._load_index()
        finally:
            if collecting:
                gc.enable()

    def _load_index(self) -> None:
        try:
            with self.index_file.open("rb") as f:
                head = json.loads(f.readline())
                if head.get("version") == INDEX_VERSION and "domains" in head:
                    entries = [Entry.from_row(row) for row in head["domains"]]  # one document
                    self.dirty = True
                elif head.get("version") == INDEX_VERSION:
                    entries = []
                    # Parsed 2000 rows per json.loads: one call per row cost a third more.
                    while chunk := [line for line in itertools.islice(f, 2000) if line.strip()]:
                        rows = json.loads(b"[" + b",".join(chunk) + b"]")
                        entries += [Entry.from_row(row) for row in rows]
                elif head.get("version") == 1:
                    entries = [Entry.from_v1(d, raw) for d, raw in head["domains"].items()]
                    self.dirty = True  # rewritten in the current format at the next save
                else:
                    raise ValueError("index version")
            del head
            # One listing, not a stat per domain (100k stats were ~1.5 s of a restart).
            on_disk = {
                e.name[: -len(SERVED_SUFFIX)]
                for e in os.scandir(self.served_dir)
                if e.name.endswith(SERVED_SUFFIX)
            }
            loaded: dict[str, Entry] = {}
            groups: dict[str, list[str]] = {}
            for entry in entries:
                if entry.served is not None and entry.domain not in on_disk:
                    entry.served = None  # the served file is gone: validate again
                if entry.served is not None:
                    groups.setdefault(entry.served.spki_sha256, []).append(entry.domain)
                loaded[entry.domain] = entry
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError) as exc:
            reload_log.warning(
                "ignoring unreadable index %s (%s); validating everything", self.index_file, exc
            )
            return
        key_users = {spki: tuple(domains) for spki, domains in groups.items()}
        with self._lock:  # readiness and metrics read the entries from the event loop
            self.entries, self.key_users = loaded, key_users
            self._served_count = None

    def save(self) -> None:
        with self._lock:
            entries = list(self.entries.values())
            self.dirty = False
        # Every served file these entries vouch for is on disk before the index is: a batch
        # publishes without fsync (refresh_many), and may still be running.
        sync_filesystem(self.served_dir)
        rows = (json.dumps(e.row(), separators=(",", ":")).encode() + b"\n" for e in entries)
        # Streamed to the file: at 100k domains the whole index in memory was ~55 MB more.
        atomic_write(self.index_file, itertools.chain([b'{"version":%d}\n' % INDEX_VERSION], rows))

    # --- reconciling with the source -----------------------------------------------------

    def changed(self) -> set[str]:
        """Domains whose source version differs from what was validated, or that are gone."""
        out: set[str] = set()
        known = 0
        # Streamed, compared one at a time (dict reads need no lock): nothing of size N is
        # built unless domains were removed, which the count below reveals.
        for domain, version in self.source.versions():
            e = self.entries.get(domain)
            if e is None:
                out.add(domain)
                continue
            known += 1
            if (e.served is None or e.served.version != version) and (
                e.rejected_version != version
            ):
                out.add(domain)
        with self._lock:
            if known < len(self.entries):
                listed = {d for d, _ in self.source.versions()}
                out |= {d for d in self.entries if d not in listed}
        return out

    def refresh(self, domain: str) -> str:
        """Validate and publish one domain. Returns loaded|rejected|removed|unchanged|inflight
        (or registered, for a domain that has no certificate yet; failed, for a valid bundle
        that could not be written to the served folder)."""
        with self._refreshing:
            return self._refresh(domain)

    def refresh_many(self, domains: Sequence[str]) -> list[str]:
        """`refresh` for each of `domains`; the new served files are made durable together,
        by one syncfs(2) instead of an fsync each (fsyncs were a third of a first start).

        A new file is published (renamed into place) before that sync, so a power cut in
        between can leave it empty. The index never vouches for such a file (`save` syncs
        before it writes): the restart finds the domain unvalidated and rewrites its file
        first thing, and until then (seconds) that domain, added just before the cut, fails
        its handshakes. A file that replaces a served one keeps its fsync (see `_refresh`).
        """
        if len(domains) == 1:
            return [self.refresh(domains[0])]
        outcomes = []
        try:
            for domain in domains:
                with self._refreshing:  # held per domain: a swap need not wait for the batch
                    outcomes.append(self._refresh(domain, durable=False))
        finally:
            try:
                sync_filesystem(self.served_dir)
            except OSError as exc:  # the index's save syncs too, and fails alike: no vouching
                reload_log.error("could not sync %s: %s", self.served_dir, exc)
        return outcomes

    def _refresh(self, domain: str, durable: bool = True) -> str:
        try:
            bundle = self.source.read(domain)
        except InFlight:
            return "inflight"
        now = time.time()
        if bundle is None:
            with self._lock:
                entry = self.entries.pop(domain, None)
                self._forget_key(entry)
            if entry is None:
                return "unchanged"
            # Counted first: a scrape must never see the effect (workers dropping the domain)
            # before the count that explains it.
            self._count("removed", domain)
            _unlink(self.served_dir / f"{domain}{SERVED_SUFFIX}")
            reload_log.info("certificate removed", extra={"domain": domain})
            return "removed"
        if bundle.version == EMPTY:
            with self._lock:
                if domain in self.entries:
                    return "unchanged"  # a served bundle stays served while files are replaced
                self.entries[domain] = Entry(domain, None, None, (), now)
                self.dirty = True
            return "registered"
        with self._lock:
            entry = self.entries.get(domain)
            if entry is not None and (
                (
                    entry.served is not None
                    and entry.served.version == bundle.version
                    and not entry.errors
                )
                or entry.rejected_version == bundle.version
            ):
                return "unchanged"
        verdict = validate_bundle(
            bundle, roots=self._roots(), key_users=self.key_users, enforce_unique_key=False
        )
        if not verdict.ok:
            if self._between_writes(domain, verdict, now):
                return "inflight"  # read again shortly (reload.py retries every 0.1 s)
            return self._reject(domain, bundle.version, verdict, now)
        self._mismatch_since.pop(domain, None)
        served_file = self.served_dir / f"{domain}{SERVED_SUFFIX}"
        # A batch leaves out the fsync only for a new file. One that replaces a served bundle
        # is synced before its rename: after a power cut, the old bundle or the new one.
        try:
            atomic_write(served_file, verdict.served_pem, durable or served_file.exists())
        except OSError as exc:  # a full disk, a read-only state folder: nothing is lost
            self._count("failed", domain)
            reload_log.error(
                "could not publish the certificate for %s (%s); what is served stays served, "
                "and the next change or rescan tries again",
                domain,
                exc,
                extra={"domain": domain},
            )
            return "failed"
        now = time.time()  # published: workers' sync times are compared with this
        assert verdict.not_after is not None and verdict.cert_sha256 and verdict.spki_sha256
        served = Served(
            bundle.version,
            verdict.not_after.timestamp(),
            verdict.cert_sha256,
            verdict.spki_sha256,
            now,
            tuple(verdict.warnings),
        )
        with self._lock:
            self._forget_key(self.entries.get(domain))
            self.entries[domain] = Entry(domain, served, None, (), now)
            _add_key_user(self.key_users, served.spki_sha256, domain)
            self.last_success = now
        self._count("loaded", domain)
        for warning in verdict.warnings:
            reload_log.warning("%s", warning, extra={"domain": domain})
        reload_log.info(
            "certificate loaded",
            extra={
                "domain": domain,
                "cert_sha256": verdict.cert_sha256[:16],
                "not_after": verdict.not_after.isoformat(),
                "origin": bundle.origin,
            },
        )
        return "loaded"

    def _reject(self, domain: str, version: str, verdict: Verdict, now: float) -> str:
        errors = tuple(str(e) for e in verdict.errors)
        with self._lock:
            entry = self.entries.setdefault(domain, Entry(domain))
            entry.rejected_version = version
            entry.errors = errors
            entry.updated_at = now
            kept = entry.served is not None
        self._count("rejected", domain)
        reload_log.warning(
            "certificate bundle for %s rejected%s: %s",
            domain,
            "; keeping the last good one" if kept else "",
            "; ".join(errors),
            extra={"domain": domain, "errors": errors, "kept_last_good": kept},
        )
        return "rejected"

    def _between_writes(self, domain: str, verdict: Verdict, now: float) -> bool:
        """A key that doesn't match its certificate, and nothing else wrong, is what a
        two-file update (certbot, an operator's two copies) looks like between its writes.
        For MISMATCH_GRACE it is read again rather than rejected: no `rejected` count, no
        warning, no 0.3 s recheck delay for every renewal."""
        if not verdict.errors or not all(isinstance(e, KeyMismatch) for e in verdict.errors):
            self._mismatch_since.pop(domain, None)
            return False
        since = self._mismatch_since.setdefault(domain, now)
        if now - since < MISMATCH_GRACE:
            return True
        del self._mismatch_since[domain]
        return False

    def _forget_key(self, entry: Entry | None) -> None:
        if entry is not None and entry.served is not None:
            spki = entry.served.spki_sha256
            users = tuple(d for d in self.key_users.get(spki, ()) if d != entry.domain)
            if users:
                self.key_users[spki] = users
            else:
                self.key_users.pop(spki, None)

    def _count(self, result: str, domain: str) -> None:
        with self._lock:
            self.counts[result] += 1
            self.dirty = True
            self._served_count = None

    def served_count(self) -> int:
        """Domains with a bundle being served (readiness asks often: counted once per change)."""
        with self._lock:
            if self._served_count is None:
                self._served_count = sum(1 for e in self.entries.values() if e.served is not None)
            return self._served_count

    # --- reading, for metrics and the admin API ------------------------------------------

    def snapshot(self) -> list[Entry]:
        with self._lock:
            return list(self.entries.values())

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.snapshot())


def _add_key_user(key_users: dict[str, tuple[str, ...]], spki: str, domain: str) -> None:
    # Tuples, not sets: keys are unique in a healthy fleet, and at 100k domains a one-element
    # set per key was ~17 MB more than a one-element tuple.
    users = key_users.get(spki, ())
    if domain not in users:
        key_users[spki] = (*users, domain)


def atomic_write(path: Path, data: bytes | Iterable[bytes], durable: bool = True) -> None:
    """temp file in the same folder (mode 0600) + fsync + rename: readers see old or new.
    `durable=False`: no fsync, the caller syncs (see CertRegistry.refresh_many)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


_LIBC = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(folder: Path) -> None:
    """Flush the filesystem that holds `folder`: syncfs(2) on Linux, which the edge needs
    anyway (inotify); os.sync() where libc lacks it. It waits for the whole filesystem's
    dirty data, other processes' too."""
    syncfs = getattr(_LIBC, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {folder}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
