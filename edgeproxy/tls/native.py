"""Client connections served by the C core (tls/_conn.c), where it is built and fits.

The C core does what tls/transport.py does (accept, handshake, TLS records, close, linger,
handshake deadlines), with none of the Python objects a connection costs there: see
bench/RESULTS.md, session 9. The protocol (proxy/forward.ClientConnection) is the same
and sees the same asyncio transport.

It reaches OpenSSL through the SSL_CTX inside Python's SSLContext objects, so it runs only
where that is sound, checked once at import (`unavailable()` says why not):
- CPython 3.11 (the _ssl object layout it relies on);
- its libssl is the very library the interpreter's _ssl module uses (same symbols), and
  the same OpenSSL version;
- a context's options read through the SSL_CTX are the ones Python reports.
Otherwise, or with EDGEPROXY_PY_TRANSPORT=1 in the environment (A/B runs, a suspected
bug), the worker serves with tls/transport.py, and says which in its "worker ready" line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from edgeproxy.logging import server_log
from edgeproxy.tls.sni import HandshakeTally, make_selector
from edgeproxy.tls.transport import ACCEPT_BACKOFF, ProtocolFactory


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("EDGEPROXY_PY_TRANSPORT") == "1":
        return None, "EDGEPROXY_PY_TRANSPORT=1"
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return None, "not CPython 3.11"
    try:
        from edgeproxy.tls import _conn  # type: ignore[attr-defined]
    except ImportError:
        return None, "not built (make builds it)"
    import _ssl

    if _conn.openssl_version() != ssl.OPENSSL_VERSION_NUMBER:
        return None, "built against another OpenSSL version than Python's"
    if not _conn.same_libssl(_ssl.__file__):
        return None, "Python's ssl module uses another libssl"
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    probe.options |= ssl.OP_NO_COMPRESSION
    if _conn.ctx_options(probe, _ssl._SSLContext) != probe.options:
        return None, "Python's SSLContext layout is not the expected one"
    return _conn, ""


_module, _why = _load()


def unavailable() -> str:
    """Why the C core can't serve here ("" when it can)."""
    return _why


class NativeServer:
    """A worker's client connections in the C core: its listeners and PROXY-protocol
    connections, one epoll set watched by the event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        base_ctx: ssl.SSLContext,
        factory: ProtocolFactory,
        lookup: Callable[[str], ssl.SSLContext | None],
        tally: HandshakeTally,
        handshake_timeout: float,
        send_timeout: float,
    ) -> None:
        if _module is None:
            raise RuntimeError(f"the C connections are unavailable: {_why}")
        import _ssl

        self.loop = loop
        self.core: Any = _module.Core(
            loop,
            base_ctx,
            _ssl._SSLContext,
            factory,
            make_selector(lookup, tally),
            self._accept_failed,
            ssl.SSLError,
            handshake_timeout,
            send_timeout,
        )
        tally.source = self.core.take_counts
        self.listening: list[int] = []
        self.closed = False
        self._last_warning = -60.0
        loop.add_reader(self.core.fileno(), self.core.poll)

    def listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.core.listen(sock.fileno())
        self.listening.append(sock.fileno())

    def close(self) -> None:
        """Stop accepting for good (the sockets belong to the supervisor)."""
        self.closed = True
        for fd in self.listening:
            self.core.unlisten(fd)

    def adopt(self, conn: socket.socket, peer: Any, factory: ProtocolFactory) -> None:
        """Start the handshake on a connection accepted elsewhere (after a PROXY header)."""
        self.core.adopt(conn.detach(), peer, factory)

    def _accept_failed(self, fd: int, errno: int) -> None:
        # Out of descriptors or memory: pause this listener instead of spinning on it.
        self.core.unlisten(fd)
        self.loop.call_later(ACCEPT_BACKOFF, self._resume, fd)
        now = time.monotonic()
        if now - self._last_warning >= 60:  # at most a line a minute under a flood
            self._last_warning = now
            server_log.warning(
                "accept failed: %s; pausing accepts for %.1f s", os.strerror(errno), ACCEPT_BACKOFF
            )

    def _resume(self, fd: int) -> None:
        if not self.closed:  # (a drain may have closed it meanwhile)
            self.core.listen(fd)
