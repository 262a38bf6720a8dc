"""One worker process: serve the edge's listeners until told to stop, then drain.

Shutdown (SIGTERM or SIGINT), in order:
1. stop accepting on every listener;
2. mark the worker draining: idle connections close now, busy ones after their response
   (with `Connection: close`);
3. wait for in-flight requests up to `server.drain_timeout`;
4. abort whatever is still open, close the upstream pools, exit 0.
SIGHUP rescans the served certificates; changes arrive by themselves (tls/follow.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import ssl
import time
from typing import Any

from prometheus_client import CollectorRegistry

from edgeproxy.asyncio_utils import as_protocol, create_task, watch_parent
from edgeproxy.config import Settings
from edgeproxy.inotify import FolderWatch
from edgeproxy.logging import AccessLog, server_log
from edgeproxy.metrics import Metrics
from edgeproxy.proxy.forward import ClientConnection, ProxyContext
from edgeproxy.proxy.headers import is_trusted
from edgeproxy.proxy.policy import PolicyBook
from edgeproxy.proxy.proxyproto import ProxyProtocolError, read_header
from edgeproxy.proxy.routes import RouteTable
from edgeproxy.proxy.upstream import UpstreamPool
from edgeproxy.tls import native
from edgeproxy.tls.follow import watch_served
from edgeproxy.tls.sni import HandshakeTally, install_sni_callback
from edgeproxy.tls.store import CertStore
from edgeproxy.tls.transport import HandshakeDeadlines, TLSListener, serve_tls

METRICS_FLUSH_INTERVAL = 0.2
"""Request histograms are written in bulk this often (see metrics.BatchedObserver)."""


class Worker:
    """The runtime state of one worker; built inside the worker process after fork."""

    def __init__(
        self,
        settings: Settings,
        base_ctx: ssl.SSLContext,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.base_ctx = base_ctx
        self.metrics = Metrics(registry or CollectorRegistry(), [r.prefix for r in settings.routes])
        self.store = CertStore(settings.certs.state / "served", settings.certs.cache_size)
        self.served_watch: FolderWatch | None = None
        self.tally = HandshakeTally()
        pools = {
            url: UpstreamPool(url, settings.proxy)
            for route in settings.routes
            for url in route.upstreams
        }
        self.ctx = ProxyContext(
            settings,
            self.metrics,
            RouteTable(settings.routes, pools),
            pools,
            self.tally,
            PolicyBook(settings.policy),
            access=AccessLog() if settings.log.access else None,
        )
        self.listeners: list[TLSListener | native.NativeServer] = []
        self.native: native.NativeServer | None = None  # the C connections, where they serve
        self.accepting: list[asyncio.Task[None]] = []
        self._last_warning = -60.0
        self.stopping = asyncio.Event()

    def rescan(self) -> None:
        self.store.scan()
        self.metrics.certificates_loaded.set(len(self.store))

    async def start(self, sockets: list[socket.socket]) -> None:
        # Watch first, then list: whatever is published after the listing raises an event.
        self.served_watch = FolderWatch(self.store.dir)
        self.rescan()
        loop = asyncio.get_running_loop()
        timeout = self.settings.server.handshake_timeout

        def factory() -> asyncio.Protocol:
            return as_protocol(ClientConnection(self.ctx))

        if not native.unavailable():
            self.native = native.NativeServer(
                loop,
                self.base_ctx,
                factory,
                self.store.context_for,
                self.tally,
                timeout,
                self.settings.server.send_timeout,
            )
            self.listeners.append(self.native)
        else:
            install_sni_callback(self.base_ctx, self.store.context_for, self.tally)
        self.deadlines = HandshakeDeadlines(loop, timeout)
        for sock in sockets:
            if self.settings.server.proxy_protocol:
                self.accepting.append(
                    create_task(self._accept_proxied(sock), name="edgeproxy.accept-proxied")
                )
                continue
            if self.native is not None:
                self.native.listen(sock)
                continue
            listener = TLSListener(
                sock,
                self.base_ctx,
                factory,
                deadlines=self.deadlines,
                tally=self.tally,
                send_timeout=self.settings.server.send_timeout,
            )
            listener.start()
            self.listeners.append(listener)
        self.metrics.workers_ready.set(1)
        self._flush_metrics()
        server_log.info(
            "worker ready",
            extra={
                "pid": os.getpid(),
                "domains": len(self.store),
                "listen": [_sockname(s) for s in sockets],
                "connections": "C" if self.native else f"Python ({native.unavailable()})",
            },
        )

    async def _accept_proxied(self, sock: socket.socket) -> None:
        """Accept loop for a listener behind an L4 balancer speaking the PROXY protocol."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENFILE, ECONNABORTED: back off, keep serving
                server_log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            create_task(self._start_proxied(conn, addr), name="edgeproxy.proxied")

    async def _start_proxied(self, conn: socket.socket, addr: Any) -> None:
        server = self.settings.server
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        if not is_trusted(addr[0], server.trusted_proxies):
            self._warn_once("PROXY protocol from an untrusted peer refused", addr[0])
            conn.close()
            return
        try:
            async with asyncio.timeout(server.handshake_timeout):
                source = await read_header(loop, conn)
        except (ProxyProtocolError, TimeoutError, OSError) as exc:
            self._warn_once(f"bad PROXY header ({exc})", addr[0])
            conn.close()
            return
        peer = source[0] if source is not None else ""

        def protocol() -> asyncio.Protocol:
            made = ClientConnection(self.ctx)
            made.peer = peer
            return as_protocol(made)

        if self.native is not None:
            self.native.adopt(conn, addr, protocol)
            return
        serve_tls(
            loop,
            conn,
            addr,
            self.base_ctx,
            protocol,
            self.tally,
            self.deadlines,
            server.send_timeout,
        )

    def _flush_metrics(self) -> None:
        self.ctx.flush_metrics()
        asyncio.get_running_loop().call_later(METRICS_FLUSH_INTERVAL, self._flush_metrics)

    def _warn_once(self, message: str, peer: str) -> None:
        """At most one line a minute: any client could otherwise flood the log."""
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            server_log.warning(
                "%s (peer %s; further ones for a minute not logged)",
                message,
                peer,
                extra={"peer": peer},
            )

    async def drain(self) -> None:
        ctx = self.ctx
        self.metrics.workers_ready.set(0)
        # 1. stop accepting
        for listener in self.listeners:
            listener.close()
        for task in self.accepting:
            task.cancel()
        # 2. draining: idle connections go now, busy ones after their response
        ctx.draining = True
        for conn in list(ctx.connections):
            conn.drain()
        # 3. wait for in-flight requests, up to the deadline
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.drain_timeout
        while ctx.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # 4. abort the rest and close the pools
        left = len(ctx.connections)
        for conn in list(ctx.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in ctx.pools.values():
            pool.close()
        # Aborted connections end their requests (499, an access line each) in callbacks the
        # loop runs next: let them, then write out the last observations and lines.
        for _ in range(20):
            if not ctx.connections:
                break
            await asyncio.sleep(0.005)
        ctx.flush_metrics()
        server_log.info("worker stopped", extra={"pid": os.getpid(), "aborted": left})

    async def serve(self, sockets: list[socket.socket], parent_pid: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.rescan)
        await self.start(sockets)
        # What exists now lives as long as the worker: gc.freeze moves it out of the garbage
        # collector's generations, so collections only look at what requests allocate.
        gc.freeze()
        certs = self.settings.certs
        watcher = create_task(
            watch_served(
                self.store,
                self.stopping,
                rescan_interval=certs.rescan_interval,
                watch=self.served_watch,
                on_change=lambda: self.metrics.certificates_loaded.set(len(self.store)),
                on_synced=self.metrics.served_synced.set,
            ),
            name="watch-served",
        )
        if parent_pid is not None:
            watch_parent(loop, parent_pid, self.stopping)
        await self.stopping.wait()
        await self.drain()
        await asyncio.wait([watcher], timeout=2)


def _sockname(sock: socket.socket) -> str:
    name: Any = sock.getsockname()
    return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"


def run_worker(
    settings: Settings, sockets: list[socket.socket], base_ctx: ssl.SSLContext, parent_pid: int
) -> int:
    """Entry point of a forked worker process; returns its exit code."""
    import uvloop

    async def main() -> None:
        await Worker(settings, base_ctx).serve(sockets, parent_pid)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0
