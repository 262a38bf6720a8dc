"""CertStore: the index of served domains and their SSL contexts.

Rules:
- The index maps an exact registered domain (lower-case A-label) to its bundle; there is
  no wildcard and no default entry.
- A bundle that fails to load is skipped with a log line and never replaces the last
  good one for its domain.
- Contexts are kept in a bounded LRU cache; a domain whose context was evicted is rebuilt
  on its next handshake from the files the index points at.

Theory of operation: `scan()` walks `certs.dir` once (at start, and on SIGHUP), building a
context for every new or changed bundle, which validates that the key loads and matches.
`context_for(name)` is what the SNI callback calls: a dict lookup on the hot path.
"""

from __future__ import annotations

import os
import re
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edgeproxy.logging import tls_log
from edgeproxy.tls.sni import new_server_context

FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"

# A registered domain: lower-case A-labels, at least one dot, an alphabetic (or IDN) TLD, so
# no IP address, no wildcard, nothing that could climb out of the certificates folder.
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+(xn--[a-z0-9-]{1,59}|[a-z]{2,63})$"
)


def is_domain_name(name: str) -> bool:
    return bool(_DOMAIN_RE.match(name))


@dataclass(frozen=True, slots=True)
class BundleRef:
    domain: str
    fullchain: Path
    privkey: Path
    signature: tuple[int, int, int, int]
    """(mtime_ns, size) of both files after following symlinks: a change means reload."""


def _signature(fullchain: Path, privkey: Path) -> tuple[int, int, int, int]:
    a, b = os.stat(fullchain), os.stat(privkey)
    return (a.st_mtime_ns, a.st_size, b.st_mtime_ns, b.st_size)


def build_context(ref: BundleRef) -> ssl.SSLContext:
    """A server context for one bundle. Raises ssl.SSLError/OSError when it can't load."""
    ctx = new_server_context()
    ctx.load_cert_chain(ref.fullchain, ref.privkey)
    return ctx


class CertStore:
    def __init__(self, certs_dir: Path, cache_size: int) -> None:
        self.dir = certs_dir
        self.cache_size = cache_size
        self.index: dict[str, BundleRef] = {}
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def scan(self) -> None:
        """Bring the index in line with the directory: add, replace, drop domains."""
        seen: set[str] = set()
        try:
            entries = sorted(os.scandir(self.dir), key=lambda e: e.name)
        except OSError as exc:
            tls_log.error(
                "cannot read the certificates folder %s: %s",
                self.dir,
                exc,
                extra={"path": str(self.dir)},
            )
            entries = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not entry.is_dir():
                continue
            if not is_domain_name(name):
                tls_log.warning(
                    "skipping %s: folder name is not a lower-case domain name",
                    entry.path,
                    extra={"path": entry.path},
                )
                continue
            seen.add(name)
            self._load(name, Path(entry.path))
        for gone in set(self.index) - seen:
            del self.index[gone]
            self._cache.pop(gone, None)
            tls_log.info("certificate removed", extra={"domain": gone})

    def _load(self, domain: str, folder: Path) -> None:
        fullchain, privkey = folder / FULLCHAIN, folder / PRIVKEY
        try:
            ref = BundleRef(domain, fullchain, privkey, _signature(fullchain, privkey))
        except OSError as exc:
            tls_log.warning(
                "skipping %s: %s",
                domain,
                exc.strerror or exc,
                extra={"domain": domain, "path": str(folder)},
            )
            return
        old = self.index.get(domain)
        if old is not None and old.signature == ref.signature:
            return
        try:
            ctx = build_context(ref)
        except (ssl.SSLError, OSError, ValueError) as exc:
            kept = "; keeping the last good bundle" if old else ""
            tls_log.warning(
                "certificate bundle for %s does not load: %s%s",
                domain,
                exc,
                kept,
                extra={"domain": domain, "path": str(folder)},
            )
            return
        self.index[domain] = ref
        self._remember(domain, ctx)
        tls_log.info("certificate loaded", extra={"domain": domain, "path": str(folder)})

    def _remember(self, domain: str, ctx: ssl.SSLContext) -> None:
        self._cache[domain] = ctx
        self._cache.move_to_end(domain)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def context_for(self, name: str) -> ssl.SSLContext | None:
        """The context serving `name`, or None when it is not registered (hot path)."""
        ctx = self._cache.get(name)
        if ctx is not None:
            self._cache.move_to_end(name)
            return ctx
        ref = self.index.get(name)
        if ref is None:
            return None
        try:
            ctx = build_context(ref)
        except (ssl.SSLError, OSError, ValueError) as exc:
            tls_log.error(
                "certificate bundle for %s no longer loads: %s", name, exc, extra={"domain": name}
            )
            return None
        self._remember(name, ctx)
        return ctx
