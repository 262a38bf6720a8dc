"""CertStore: what a worker serves, by exact domain, with SSL contexts built on demand.

Rules:
- The store reads only the registry's served folder (`<state>/served/<domain>.pem`, key then
  chain, each validated before the registry wrote it and replaced atomically), never the
  operators' folder: a bad write there can't reach a handshake.
- The index maps a lower-case A-label domain to its served file; no wildcard, no default.
- Contexts live in a bounded LRU cache (`certs.cache_size`); an evicted domain's context is
  rebuilt on its next handshake (~1 ms). An unknown name allocates nothing.
- `refresh(domain)` after a change builds the new context first and then swaps it in, so no
  handshake sees a half-updated entry; connections already open keep their old context.

Theory of operation: `scan()` lists the served folder once (no parsing), so start-up is a
directory listing even for 100k domains. The SNI callback calls `context_for(name)`: a dict
lookup on the hot path, plus one build the first time a domain is seen.
"""

from __future__ import annotations

import os
import re
import ssl
from collections import OrderedDict
from pathlib import Path

from edgeproxy.logging import tls_log
from edgeproxy.tls.sni import new_server_context

# A registered domain: lower-case A-labels, at least one dot, an alphabetic (or IDN) TLD, so
# no IP address, no wildcard, nothing that could climb out of the certificates folder.
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+(xn--[a-z0-9-]{1,59}|[a-z]{2,63})$"
)
SERVED_SUFFIX = ".pem"


def is_domain_name(name: str) -> bool:
    return bool(_DOMAIN_RE.match(name))


def build_context(served_file: Path) -> ssl.SSLContext:
    """A server context from a served file (key + chain). Raises ssl.SSLError/OSError."""
    ctx = new_server_context()
    ctx.load_cert_chain(served_file)
    return ctx


class CertStore:
    def __init__(self, served_dir: Path, cache_size: int) -> None:
        self.dir = served_dir
        self.cache_size = cache_size
        self.index: set[str] = set()
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def path(self, domain: str) -> Path:
        return self.dir / f"{domain}{SERVED_SUFFIX}"

    def scan(self) -> None:
        """Bring the index in line with the served folder (start, SIGHUP, periodic)."""
        try:
            names = {
                e.name[: -len(SERVED_SUFFIX)]
                for e in os.scandir(self.dir)
                if e.name.endswith(SERVED_SUFFIX)
            }
        except FileNotFoundError:
            names = set()
        found = {n for n in names if is_domain_name(n)}
        for gone in self.index - found:
            self._cache.pop(gone, None)
        self.index = found

    def refresh(self, domain: str) -> None:
        """The served file of `domain` changed or vanished: swap or drop its entry."""
        path = self.path(domain)
        if not path.exists():
            self.index.discard(domain)
            self._cache.pop(domain, None)
            return
        self.index.add(domain)
        if domain in self._cache:
            ctx = self._build(domain)
            if ctx is not None:
                self._cache[domain] = ctx

    def context_for(self, name: str) -> ssl.SSLContext | None:
        """The context serving `name`, or None when it is not registered (hot path)."""
        ctx = self._cache.get(name)
        if ctx is not None:
            self._cache.move_to_end(name)
            return ctx
        if name not in self.index:
            return None
        ctx = self._build(name)
        if ctx is None:
            return None
        self._cache[name] = ctx
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ctx

    def _build(self, domain: str) -> ssl.SSLContext | None:
        try:
            return build_context(self.path(domain))
        except (ssl.SSLError, OSError) as exc:
            tls_log.error(
                "served bundle for %s does not load: %s", domain, exc, extra={"domain": domain}
            )
            return None
