"""The beacon hot path: a client connection's requests, routed and forwarded upstream.

Rules:
- Only the configured tracker routes reach an upstream; every other request is answered
  by the edge (404, 400, 413, 421, 431, ...) and never leaves it.
- A request whose Host (port aside) is not its connection's SNI name gets 421, so one
  customer's connection can't be used to reach another customer's host.
- Request and response bodies stream through with flow control both ways; the request
  body limit is enforced on Content-Length up front and on chunked bodies as they arrive.
- Beacon routes answer within `response_timeout` (504) and fail fast when no upstream
  accepts a connection (502, after one retry on another URL of the route). Long-lived
  routes (chat) may upgrade to a WebSocket tunnel and stream, bounded by an idle timeout.
- Every request ends in exactly one `_finish`: one metric observation, one access line.

Theory of operation: `ClientConnection` is the asyncio protocol of one TLS connection;
llhttp (httptools) calls its `on_*` methods as bytes arrive. When a request's headers are
complete it becomes the head of the connection's queue (pipelined requests wait behind
it) and gets an `Exchange`. The exchange finds an upstream connection (the only await on
the path) and writes the request; from then on everything is callbacks: upstream parser
-> exchange -> client transport, and client parser -> exchange -> upstream transport.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

from edgeproxy.asyncio_utils import create_task
from edgeproxy.config import Settings
from edgeproxy.errors import UpstreamError, UpstreamTimeout
from edgeproxy.logging import AccessLog, proxy_log
from edgeproxy.metrics import NO_ROUTE, BatchedObserver, Metrics
from edgeproxy.proxy import cookies, firstparty
from edgeproxy.proxy.firstparty import FirstParty
from edgeproxy.proxy.headers import (
    FORWARDING,
    HOP_BY_HOP,
    Header,
    anonymize,
    client_address,
    direct_forwarding_lines,
    forwarding_headers,
    header_lines,
    is_trusted,
)
from edgeproxy.proxy.policy import Policy, PolicyBook
from edgeproxy.proxy.routes import RouteTable, RouteTarget, is_safe_path
from edgeproxy.proxy.upstream import UpstreamConnection, UpstreamHeadTooLarge, UpstreamPool
from edgeproxy.tls.sni import HandshakeTally

REPLAY_LIMIT = 65536
"""Request bodies up to this size are kept so a stale pooled connection can be retried."""
BUFFER_LIMIT = 262144
"""Request body bytes buffered before an upstream is attached, before reading pauses."""

# Reasons the client's reading is paused; reading resumes when none is left.
_PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
_PAUSE_BUFFER = 2  # body buffered while no upstream is attached yet
_PAUSE_PIPELINE = 4  # a complete request waits for the response ahead of it
_PAUSE_CLIENT = 8  # the client doesn't read what it is sent (its write buffer is full)

_REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    499: b"Client Closed Request",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    408: "request_timeout",
    413: "body_too_large",
    421: "misdirected_request",
    431: "headers_too_large",
    501: "not_implemented",
    502: "bad_gateway",
    503: "draining",
    504: "gateway_timeout",
}


@dataclass(slots=True)
class ProxyContext:
    """Per-worker state shared by every client connection."""

    settings: Settings
    metrics: Metrics
    routes: RouteTable
    pools: dict[str, UpstreamPool]
    tally: HandshakeTally
    policies: PolicyBook
    connections: set[ClientConnection] = field(default_factory=set)
    access: AccessLog | None = None
    """Where access lines go; None when `log.access` is off."""
    draining: bool = False
    pid: int = field(default_factory=os.getpid)
    _hist: dict[str, list[BatchedObserver]] = field(default_factory=dict)
    """Per route, the request_duration observers by status // 100 (0 and 1 both 1xx)."""
    _upstream_hist: dict[str, BatchedObserver] = field(default_factory=dict)
    _handshakes: dict[str, Any] = field(default_factory=dict)
    _active_flushed: int = 0

    timer_step: float = 0.0
    """How far ahead a connection's timer is set at most (see ClientConnection._arm)."""

    def __post_init__(self) -> None:
        s = self.settings
        self.timer_step = min(
            s.server.header_timeout, s.server.keepalive_timeout, s.proxy.response_timeout
        )
        self._handshakes = {r: self.metrics.tls_handshakes.labels(r) for r in self.tally.RESULTS}
        for route in self.metrics.route_labels:
            child = self.metrics.upstream_duration.labels(route)
            self._upstream_hist[route] = BatchedObserver(child)
            by_class = [
                BatchedObserver(self.metrics.request_duration.labels(route, cls))
                for cls in ("1xx", "2xx", "3xx", "4xx", "5xx")
            ]
            self._hist[route] = [by_class[0], *by_class]

    def flush_metrics(self) -> None:
        """Hand what the hot path gathered in plain Python to the (multiprocess) metrics, and
        the access lines to stdout."""
        if self.access is not None:
            self.access.flush()
        for by_class in self._hist.values():
            for observer in by_class[1:]:
                observer.flush()
        for observer in self._upstream_hist.values():
            observer.flush()
        self.tally.flush(lambda result, n: self._handshakes[result].inc(n))
        if len(self.connections) != self._active_flushed:
            self._active_flushed = len(self.connections)
            self.metrics.connections_active.set(self._active_flushed)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self._hist[route][min(status // 100, 5)].observe(seconds)

    def observe_upstream(self, route: str, seconds: float) -> None:
        self._upstream_hist[route].observe(seconds)

    def upstream_error(self, route: str, kind: str) -> None:
        self.metrics.upstream_errors.labels(route, kind).inc()


class _HeadersTooLarge(Exception):
    pass


class Request:
    """One request on a client connection, from its first byte to the end of its response."""

    __slots__ = (
        "target",
        "headers",
        "header_bytes",
        "method",
        "version",
        "keep_alive",
        "upgrade",
        "chunks",
        "body_size",
        "complete",
        "chunked",
        "content_length",
        "exchange",
        "route",
        "path",
        "started",
        "discard",
        "status",
        "host",
        "refusal",
        "fp",
        "forward",
        "jar",
        "origin",
        "acrm",
        "acrh",
        "expect_continue",
        "upgrade_to",
    )

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[Header] = []
        self.header_bytes = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.chunks: list[bytes] = []
        """Body bytes not yet handed to an upstream (kept for replay while small)."""
        self.body_size = 0
        self.complete = False
        self.chunked = False
        self.content_length: int | None = None
        self.exchange: Exchange | None = None
        self.route = NO_ROUTE
        self.path = b""
        self.started = 0.0
        self.discard = False
        """The edge answered without forwarding: body bytes are dropped."""
        self.status = 0
        self.host = b""
        """The checked authority (host[:port]) sent upstream as Host."""
        self.fp: FirstParty | None = None
        """Cookies, visitor id and CORS for a forwarded request (see firstparty.py)."""
        self.refusal: tuple[int, str] | None = None
        """Found while parsing (bad framing, body over the limit): answered when its turn comes."""
        # Read from the head in one pass (_read_head):
        self.forward: list[Header] = []
        """End-to-end headers passed upstream as they came (name case and order kept)."""
        self.jar: list[bytes] = []
        self.origin: bytes | None = None
        self.acrm: bytes | None = None
        self.acrh = b""
        self.expect_continue = False
        self.upgrade_to = b""


class ClientConnection:
    """One client TLS connection (the protocol is made once its handshake has succeeded)."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        # Looked up once: on Python 3.11 every get_running_loop() is a getpid(2) syscall,
        # which cost ~12% of a keep-alive beacon when called per request.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Made in connection_made; dropped in connection_lost (it refers back to us).
        self.parser: httptools.HttpRequestParser | None = None
        self.sni = ""
        self.peer = ""
        self.current: Request | None = None
        self.queue: deque[Request] = deque()
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_early = b""
        self.closed = False
        self.eof = False
        self._paused = 0
        # One lazy timer per connection (see _arm): its deadline and what runs then.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._on_deadline: Callable[[], None] | None = None
        self._write_waiter: UpstreamConnection | None = None
        self._in_head = False
        self._head_bytes = 0
        self._in_trailers = False
        # Upstream writes made while the parser runs are joined into one (see data_received).
        self._feeding = False
        self._cork: list[bytes] = []
        self._cork_conn: UpstreamConnection | None = None
        self.policy: Policy | None = None
        self._forwarding: bytes | None = None
        self._client_addr = ""  # the access log's client, once known for the connection
        self._good_host = b""
        self._timed: Request | None = None  # the request whose head the timer bounds
        server = ctx.settings.server
        self._max_header_bytes = server.max_header_bytes
        self._max_headers = server.max_headers
        self._max_body_bytes = server.max_body_bytes
        self._last_path = b""  # the last path that was checked and routed, and its route
        self._last_route: RouteTarget | None = None

    # --- connection lifecycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the handshake is done (tls/transport.py makes the protocol only then).
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpRequestParser(self)
        ctx = self.ctx
        ctx.connections.add(self)  # edgeproxy_connections_active is its size, at each flush
        self.sni = transport.get_extra_info("sni") or ""
        peer = transport.get_extra_info("peername")
        if not self.peer:  # set from a PROXY header, when the listener speaks it
            self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.policy = ctx.policies.for_domain(self.sni)
        if ctx.draining:
            transport.close()
            return
        # The first request gets the header timeout, not the (longer) keep-alive one.
        self._arm(ctx.settings.server.header_timeout, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.parser = None  # break the parser <-> protocol cycle
        self._timed = None
        self._on_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
        for req in list(self.queue):
            if req.exchange is not None:
                req.exchange.on_client_lost()
        self.queue.clear()

    @property
    def reading_request(self) -> bool:
        """A request is partly in (its head or body): closing now leaves the rest unread,
        and the transport lingers rather than reset the connection (tls/transport.py)."""
        return self.current is not None

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            if self.queue and self.queue[0].exchange is not None:
                self.queue[0].exchange.touch()
            return
        if self._in_head:
            # llhttp hands a header over only once its value is complete; count raw bytes so a
            # value streaming without a line end can't grow past the limit meanwhile.
            self._head_bytes += len(data)
            if self._head_bytes > self.ctx.settings.server.max_header_bytes + 65536:
                self._reject(431)
                return
        self._feeding = True
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as exc:
            self.tunnel_early += data[exc.args[0] :]
            self._pause(_PAUSE_PIPELINE)
        except _HeadersTooLarge:
            self._reject(431)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _HeadersTooLarge):
                self._reject(431)
            elif cause is not None and not isinstance(cause, httptools.HttpParserError):
                raise cause from exc  # our bug, not the client's: let the loop log it
            else:
                self._reject(400)
        finally:
            self._feeding = False
            if self._cork:
                self._uncork()
            if self._in_head and self.current is not None and self.current is not self._timed:
                # A head left incomplete by this read gets the header timeout (once: more
                # bytes don't extend it). Armed here, not at its first byte: most heads end
                # in the read they start in, and then that timer would be wasted.
                self._arm_header_timeout()

    def write_upstream(self, conn: UpstreamConnection, data: bytes) -> None:
        """Write to an upstream; while the parser runs, held back and joined (a head and
        the body that came in the same read go in one write, not two)."""
        if not self._feeding:
            conn.write(data)
            return
        if self._cork and self._cork_conn is not conn:
            self._uncork()
        self._cork.append(data)
        self._cork_conn = conn

    def _uncork(self) -> None:
        conn, out, self._cork, self._cork_conn = self._cork_conn, self._cork, [], None
        if conn is not None:
            conn.write(out[0] if len(out) == 1 else b"".join(out))

    def eof_received(self) -> bool | None:
        # Over TLS a half-close can't be kept open (asyncio's SSL transport ignores True), so
        # a client that stops sending has ended the connection.
        self.eof = True
        return False

    def pause_writing(self) -> None:
        # Nothing more is read from a client that doesn't read its answers: pipelined
        # requests the edge answers itself (a 404) would otherwise pile up their answers in
        # the worker's memory (a client sending without reading took a worker past 1 GB).
        self._pause(_PAUSE_CLIENT)
        head = self.queue[0] if self.queue else None
        conn = head.exchange.conn if head is not None and head.exchange is not None else None
        conn = conn or self.tunnel
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()
            self._write_waiter = conn

    def resume_writing(self) -> None:
        self._resume(_PAUSE_CLIENT)
        conn, self._write_waiter = self._write_waiter, None
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()

    # --- timers and flow control -----------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` in `delay` seconds unless re-armed or disarmed before.

        Lazy: the loop's timer is set at most `timer_step` (the shortest of the usual
        timeouts) ahead and only checks the deadline when it fires, so the three timeouts of a
        keep-alive request (header, response, idle) cost no timer operation at all; before,
        each request created and cancelled three timers.
        """
        now = self.loop.time()
        self._deadline = when = now + delay
        self._on_deadline = callback
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires first, then looks at the new deadline
            self._timer.cancel()
        self._timer_at = at = min(when, now + self.ctx.timer_step)
        self._timer = self.loop.call_at(at, self._check_deadline)

    def _disarm(self) -> None:
        self._on_deadline = None

    def _check_deadline(self) -> None:
        self._timer = None
        callback = self._on_deadline
        if callback is None or self.closed:
            return
        now = self.loop.time()
        if now < self._deadline - 0.001:  # (libuv timers have ms resolution: no spinning)
            self._timer_at = at = min(self._deadline, now + self.ctx.timer_step)
            self._timer = self.loop.call_at(at, self._check_deadline)
            return
        self._on_deadline = None
        callback()

    def _arm_header_timeout(self) -> None:
        if not self.queue:  # behind a request in flight, finish() arms it when its turn comes
            self._timed = self.current
            self._arm(self.ctx.settings.server.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        if self.current is not None and self.current.header_bytes:
            self._reject(408)
        elif self.transport is not None:
            self.transport.close()

    def _on_idle_timeout(self) -> None:
        if not self.queue and self.transport is not None:
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        req = Request()
        req.header_bytes = 1
        self.current = req
        self._in_head = True
        self._head_bytes = 0
        self._in_trailers = False

    # (llhttp calls these only between on_message_begin and on_message_complete: `current`
    # is set, unchecked here.)

    def on_url(self, url: bytes) -> None:
        req: Request = self.current  # type: ignore[assignment]
        req.target += url
        req.header_bytes += len(url)
        if req.header_bytes > self._max_header_bytes:
            raise _HeadersTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        req: Request = self.current  # type: ignore[assignment]
        if not self._in_trailers:
            req.headers.append((name, value))
        # Chunked trailers are counted but dropped: they must never reach the forwarded head.
        req.header_bytes += len(name) + len(value) + 4
        if req.header_bytes > self._max_header_bytes or len(req.headers) > self._max_headers:
            raise _HeadersTooLarge

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None and self.parser is not None
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        req.started = time.perf_counter()
        self._in_head = False
        self._in_trailers = True
        _read_head(req, self._max_body_bytes)
        self.queue.append(req)
        if len(self.queue) == 1:
            self._on_deadline = None  # (_disarm, inlined: once per beacon)
            self._start(req)

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        req.body_size += len(body)
        if req.discard:
            return
        if req.body_size > self._max_body_bytes:
            if self.queue and self.queue[0] is req:
                self._body_too_large(req)
            else:  # pipelined: answered 413 when its turn comes
                req.refusal = (413, "request body over the limit")
                req.discard = True
                req.chunks = []
            return
        ex = req.exchange
        if ex is not None and ex.conn is not None:
            if not ex.finished:
                self.write_upstream(ex.conn, _chunk(body) if req.chunked else body)
            if req.body_size <= REPLAY_LIMIT:  # kept whole for a retry on a fresh connection
                if len(req.chunks) >= 64:  # many small reads: one piece, still all of it
                    req.chunks = [b"".join(req.chunks)]
                req.chunks.append(body)
        else:
            req.chunks.append(body)
            if req.body_size > BUFFER_LIMIT:
                self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        self.current = None
        req.complete = True
        ex = req.exchange
        if req.chunked and ex is not None and ex.conn is not None and not ex.finished:
            if not req.discard:
                self.write_upstream(ex.conn, b"0\r\n\r\n")
        if self.queue and self.queue[0] is not req:
            # Pipelined behind a response still in progress: read no further for now.
            self._pause(_PAUSE_PIPELINE)
        elif self.queue and req.discard and req.exchange is None and req.status:
            self._finish_local(req)

    # --- request dispatch ------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        """Route one request whose headers are complete: answer it here or forward it."""
        if self.transport is None or self.transport.is_closing():
            return  # already answered and closing: the rest of the read buffer is ignored
        ctx = self.ctx
        if req.refusal is not None:
            return self._respond(req, *req.refusal)
        host: bytes | None = req.host or None
        target = req.target
        if target.startswith(b"/"):
            path = target.split(b"?", 1)[0]
        elif target[:8].lower() in (b"https://", b"http://") or target[:7].lower() == b"http://":
            # absolute-form (RFC 9112 section 3.2.2): the authority replaces Host.
            try:
                url: Any = httptools.parse_url(target)  # (Any: see below)
            except httptools.HttpParserInvalidURLError:
                return self._respond(req, 400, "invalid request target")
            # httptools' stub types the parts bytes and int, but a part not in the URL is
            # None, and compiled code (setup.py) would check for the stub's types.
            port: int | None = url.port
            query: bytes | None = url.query
            host = url.host or b""
            if port:
                host += b":%d" % port
            path = url.path or b"/"
            req.target = path + (b"?" + query if query else b"")
        else:
            return self._respond(req, 400, "invalid request target")
        if host is None:
            if req.version != "1.0":
                return self._respond(req, 400, "missing Host header")
            host = self.sni.encode()
        if host != self._good_host:  # checked once per connection, not per request
            if not _HOST_RE.match(host):
                return self._respond(req, 400, "invalid Host")
            if _host_name(host) != self.sni:
                return self._respond(req, 421, "this connection serves another host")
            self._good_host = host
        req.host = host
        req.path = path
        if path == self._last_path:  # a connection's beacons mostly go to one path
            target_route = self._last_route
        else:
            if not is_safe_path(path):
                return self._respond(req, 400, "dot segments are not allowed in the path")
            target_route = ctx.routes.match(path)
            if target_route is None:
                return self._respond(req, 404, "no such route")
            self._last_path, self._last_route = path, target_route
        assert target_route is not None
        req.route = target_route.prefix
        if ctx.draining:
            return self._respond(req, 503, "the edge is shutting down")
        assert self.policy is not None  # set at connection_made
        fp = req.fp = firstparty.decide(self.policy, req.jar, req.origin, req.acrm, req.acrh)
        if req.method == b"OPTIONS" and fp.preflight_method is not None:
            return self._answer(req, *firstparty.preflight_answer(fp))  # never forwarded
        if fp.opted_out:
            return self._answer(req, 204, firstparty.opt_out_headers(fp))
        if req.upgrade and not target_route.long_lived:
            req.keep_alive = False  # the parser is in upgrade mode: no next request here
        ex = Exchange(self, req, target_route)
        req.exchange = ex
        ex.start()

    def _body_too_large(self, req: Request) -> None:
        ex = req.exchange
        if ex is not None:
            ex.fail(413, "request body over the limit")
        else:
            self._respond(req, 413, "request body over the limit")

    def _respond(self, req: Request, status: int, message: str) -> None:
        """Answer a request with an edge error: nothing of it is forwarded."""
        body = b'{"error":"%s","message":"%s"}\n' % (
            _ERROR_CODES.get(status, "error").encode(),
            message.encode(),
        )
        self._answer(req, status, [(b"Content-Type", b"application/json")], body)

    def _answer(self, req: Request, status: int, headers: list[Header], body: bytes = b"") -> None:
        """Answer a request at the edge (an error, a preflight, an opt-out)."""
        req.discard = True
        req.chunks = []
        # Close unless the request is complete: its unread body would be read as a request.
        close = bool(not req.complete and (req.content_length or req.chunked))
        if status in (400, 408, 413, 431) or not req.keep_alive or self.ctx.draining:
            close = True
        if req.upgrade or req.version == "1.0":
            close = True
        req.status = status
        if not any(n.lower() == b"cache-control" for n, _ in headers):
            headers = [*headers, (b"Cache-Control", b"no-store")]
        if status not in (204, 304):
            headers = [*headers, (b"Content-Length", b"%d" % len(body))]
        self.write_head(status, _REASONS.get(status) or _phrase(status), headers, close=close)
        self.write(body)
        if close:
            req.keep_alive = False
        if req.complete or close:
            self._finish_local(req)

    def _finish_local(self, req: Request) -> None:
        self.finish(req, req.status, keep_alive=req.keep_alive, upstream=None, bytes_out=0)

    def write_head(self, status: int, reason: bytes, headers: list[Header], *, close: bool) -> None:
        self.write(head_bytes(status, reason, headers, close))

    def _reject(self, status: int) -> None:
        """A request that can't even be parsed: answer and close the connection."""
        if self.closed or self.transport is None:
            return
        # The parser is in an error state: nothing more is read from this connection.
        self._pause(_PAUSE_PIPELINE)
        req, self.current = self.current, None
        message = _ERROR_CODES[status].replace("_", " ")
        if self.queue:
            head = self.queue[0]
            if head is req and head.exchange is not None and not head.exchange.finished:
                head.exchange.fail(status, message)
            else:
                for queued in self.queue:
                    queued.keep_alive = False  # close once the response in flight is done
            return
        req = req or Request()
        req.keep_alive = False
        req.started = req.started or time.perf_counter()
        self.queue.append(req)
        self._respond(req, status, message)

    def finish(
        self,
        req: Request,
        status: int,
        *,
        keep_alive: bool,
        upstream: str | None,
        bytes_out: int,
        now: float = 0.0,
    ) -> None:
        """The end of one request: metrics, access log, then the next request or close.
        `now` is time.perf_counter() when the caller has just read it."""
        ctx = self.ctx
        elapsed = (now or time.perf_counter()) - req.started if req.started else 0.0
        ctx.observe(req.route, status, elapsed)
        if ctx.access is not None:
            ctx.access.request(
                ctx.pid,
                self._client_addr or self._client(req),
                self.sni,
                req.method.decode("latin-1"),
                # The query string carries beacon payloads: never logged.
                (req.path or req.target.split(b"?", 1)[0])[:256].decode("latin-1"),
                req.route,
                status,
                req.body_size,
                bytes_out,
                elapsed,
                upstream,
            )
        if self.queue and self.queue[0] is req:
            self.queue.popleft()
        transport = self.transport
        if transport is None or self.closed:
            return
        if not keep_alive or not req.complete or ctx.draining or self.eof:
            transport.close()
            return
        if self.queue:
            # Next turn of the loop, not a nested call: a long pipeline of requests answered
            # by the edge would otherwise recurse once per request.
            self.loop.call_soon(self._start_next)
            return
        if self._paused:  # (the call only when there is something to resume)
            self._resume(_PAUSE_PIPELINE)
        if self.current is not None:  # a pipelined request still arriving: bound its head
            self._arm_header_timeout()
        else:
            self._arm(ctx.settings.server.keepalive_timeout, self._on_idle_timeout)

    def _start_next(self) -> None:
        if self.closed or not self.queue:
            return
        head = self.queue[0]
        if head.exchange is None and not head.status:
            self._start(head)
        if self.queue and self.queue[0] is head and head.exchange is not None:
            self._resume(_PAUSE_PIPELINE)

    def forwarding_lines(self, req: Request) -> bytes:
        """X-Forwarded-* and Forwarded for a request, as header lines. An untrusted peer's
        incoming chain is discarded, so its lines are the same for every request: made once."""
        if self._forwarding is not None:
            return self._forwarding
        settings = self.ctx.settings
        trusted = settings.server.trusted_proxies
        if not trusted and not settings.policy.anonymize_ip:  # the default
            self._forwarding = lines = direct_forwarding_lines(self.peer, self.sni.encode())
            return lines
        lines = header_lines(
            forwarding_headers(
                req.headers, self.peer, self.sni.encode(), trusted, settings.policy.anonymize_ip
            )
        )
        if not is_trusted(self.peer, trusted):
            self._forwarding = lines
        return lines

    def _client(self, req: Request) -> str:
        """The visitor's address for the access log (anonymized when the policy says so).
        An untrusted peer is the visitor for every request: made once per connection."""
        settings = self.ctx.settings
        trusted = settings.server.trusted_proxies
        client = client_address(req.headers, self.peer, trusted)
        client = anonymize(client) if settings.policy.anonymize_ip else client
        if not is_trusted(self.peer, trusted):
            self._client_addr = client
        return client

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the response in flight."""
        if not self.queue and self.current is None and self.transport is not None:
            self.transport.close()

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.tunnel = conn  # the exchange's idle timer stays armed: it bounds the tunnel
        early, self.tunnel_early = self.tunnel_early, b""
        if early:
            conn.write(early)
        self._paused = 0
        if self.transport is not None:
            self.transport.resume_reading()


# reg-name or [IPv6], then an optional port: anything else in Host is refused (RFC 9110 7.2).
_HOST_RE = re.compile(rb"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


_HEAD_END = {False: b"\r\n", True: b"Connection: close\r\n\r\n"}  # by close-after


def head_bytes(status: int, reason: bytes, headers: list[Header], close: bool) -> bytes:
    return _status_and_headers(status, reason, headers) + _HEAD_END[close]


def _status_and_headers(status: int, reason: bytes, headers: list[Header]) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%s" % (status, reason, header_lines(headers))


# What the single pass over a request head does with a header besides forwarding it as is.
_H_DROP, _H_HOST, _H_LENGTH, _H_CODING, _H_CONNECTION, _H_COOKIE, _H_EXPECT, _H_UPGRADE = range(8)
_H_ORIGIN, _H_ACRM, _H_ACRH = 8, 9, 10  # read, and forwarded too
_REQUEST_KIND: dict[bytes, int] = {
    # Rebuilt by the edge (forwarding chain, visitor id) or consumed (hop-by-hop): dropped.
    **dict.fromkeys(HOP_BY_HOP | FORWARDING | firstparty.CONSUMED, _H_DROP),
    b"host": _H_HOST,
    b"content-length": _H_LENGTH,
    b"transfer-encoding": _H_CODING,
    b"connection": _H_CONNECTION,
    b"cookie": _H_COOKIE,
    b"expect": _H_EXPECT,
    b"upgrade": _H_UPGRADE,
    b"origin": _H_ORIGIN,
    b"access-control-request-method": _H_ACRM,
    b"access-control-request-headers": _H_ACRH,
}


def _read_head(req: Request, max_body: int) -> None:
    """One pass over the request headers, once they are complete: framing (Host,
    Content-Length, Transfer-Encoding), what first-party needs, and the end-to-end headers
    to forward (hop-by-hop ones, those named in Connection and the rebuilt ones dropped).

    Anything wrong is kept as `req.refusal` and answered when the request's turn comes.
    """
    forward = req.forward
    tokens: list[bytes] = []
    for header in req.headers:
        name, value = header
        kind = _REQUEST_KIND.get(name.lower())
        if kind is None:
            forward.append(header)
        elif kind >= _H_ORIGIN:
            forward.append(header)
            if kind == _H_ORIGIN:
                req.origin = value.strip()
            elif kind == _H_ACRM:
                req.acrm = value.strip()
            else:
                req.acrh = value
        elif kind == _H_COOKIE:
            req.jar.append(value)
        elif kind == _H_HOST:
            if req.host:
                req.refusal = (400, "two Host headers")
            req.host = value.strip()
        elif kind == _H_LENGTH:
            try:
                req.content_length = int(value)
            except ValueError:
                req.refusal = (400, "bad Content-Length")
        elif kind == _H_CODING:
            req.chunked = True
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings != [b"chunked"]:
                # RFC 9112 6.1: a coding the edge can't decode is 501, never passed through
                req.refusal = (501, "only the chunked transfer coding is supported")
        elif kind == _H_CONNECTION:
            tokens += [t.strip().lower() for t in value.split(b",")]
        elif kind == _H_EXPECT:
            req.expect_continue |= value.strip().lower() == b"100-continue"
        elif kind == _H_UPGRADE and not req.upgrade_to:
            req.upgrade_to = value
    if tokens:
        named = {t for t in tokens if t and t not in HOP_BY_HOP}
        if named:  # a header named in Connection is hop-by-hop too (RFC 9110 7.6.1)
            req.forward = [(n, v) for n, v in forward if n.lower() not in named]
    if req.content_length is not None and req.content_length > max_body:
        req.refusal = (413, f"request body over {max_body} bytes")


def _host_name(host: bytes) -> str:
    """The host of a Host header, lower-cased, without port or trailing dot."""
    h = host.strip().lower()
    if h.startswith(b"["):
        end = h.find(b"]")  # (find, not `in`: see routes._MAY_HIDE_A_DOT_SEGMENT)
        h = h[1:end] if end >= 0 else h
    else:
        port = h.rfind(b":")
        h = h[:port] if port >= 0 else h
    return h.rstrip(b".").decode("latin-1")


class Exchange:
    """One forwarded request: picks the upstream, writes the request, relays the response."""

    __slots__ = (
        "client",
        "req",
        "target",
        "pool",
        "conn",
        "finished",
        "head_sent",
        "chunked_out",
        "close_after",
        "status",
        "bytes_out",
        "timer_armed",
        "upstream_started",
        "last_activity",
        "reused",
        "retried",
        "pending",
    )

    def __init__(self, client: ClientConnection, req: Request, target: RouteTarget) -> None:
        self.client = client
        self.req = req
        self.target = target
        self.pool: UpstreamPool | None = None
        self.conn: UpstreamConnection | None = None
        self.finished = False
        self.head_sent = False
        self.chunked_out = False
        self.close_after = False
        self.status = 0
        self.bytes_out = 0
        self.timer_armed = False
        """The connection's timer is this exchange's (see ClientConnection._arm)."""
        self.upstream_started = 0.0
        self.last_activity = 0.0
        self.reused = False
        self.retried = False
        self.pending = b""

    # --- setting up ------------------------------------------------------------------------

    def start(self) -> None:
        """Arm the timeout and send on a pooled connection right away when there is one;
        only a new connection needs a task (the common keep-alive case stays synchronous)."""
        client = self.client
        proxy = client.ctx.settings.proxy
        self.upstream_started = time.perf_counter()
        timeout = (
            proxy.long_lived_idle_timeout if self.target.long_lived else proxy.response_timeout
        )
        self.last_activity = client.loop.time()
        client._arm(timeout, self._on_timeout)
        self.timer_armed = True
        target = self.target
        if len(target.pools) == 1:
            pool, alternative = target.pools[0], None
        else:
            pool, alternative = target.pick()
        conn = pool.take_idle()
        if conn is not None:
            self.reused = True
            self._send(pool, conn)
        else:
            create_task(self._connect(pool, alternative), name="edgeproxy.connect")

    async def _connect(self, pool: UpstreamPool, alternative: UpstreamPool | None) -> None:
        if self.finished:
            return  # the client left before this task got its turn
        try:
            conn = await self._open(pool)
        except UpstreamError as exc:
            if alternative is None or self.finished:
                return self.fail(exc.status_hint, exc.message)
            pool = alternative  # one retry, on another URL of the route
            try:
                conn = await self._open(pool)
            except UpstreamError as exc2:
                return self.fail(exc2.status_hint, exc2.message)
        if self.finished:
            pool.release(conn)  # the client went away (or timed out) while we connected
            return
        self._send(pool, conn)

    async def _open(self, pool: UpstreamPool) -> UpstreamConnection:
        try:
            return await pool.connect()
        except UpstreamError as exc:
            self.client.ctx.upstream_error(self.target.prefix, "connect")
            proxy_log.warning(
                "%s", exc.message, extra={"route": self.target.prefix, "upstream": pool.url}
            )
            raise

    def _send(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        req = self.req
        self.pool, self.conn = pool, conn
        conn.start(self, head_only=req.method == b"HEAD")
        # Head, the body so far and the terminator in one write: one syscall, not three.
        parts = [self._request_head(pool)]
        if req.chunks:
            parts += [_chunk(c) for c in req.chunks] if req.chunked else req.chunks
            if req.body_size > REPLAY_LIMIT:
                req.chunks = []
            self.client._resume(_PAUSE_BUFFER)
        if req.complete and req.chunked:
            parts.append(b"0\r\n\r\n")
        self.client.write_upstream(conn, b"".join(parts))
        if not req.complete and req.expect_continue:
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _request_head(self, pool: UpstreamPool) -> bytes:
        req = self.req
        client = self.client
        # Host and framing are rebuilt from what the edge checked and parsed, never copied: a
        # header named in Connection, or a second copy, can't change what upstream reads.
        parts = [
            b"%s %s%s HTTP/1.1\r\nHost: %s\r\n"
            % (req.method, pool.base_path, req.target, req.host or client.sni.encode())
        ]
        parts.append(header_lines(req.forward))
        if req.content_length is not None and not req.chunked:
            parts.append(b"Content-Length: %d\r\n" % req.content_length)
        if req.fp is not None:
            parts.append(firstparty.request_lines(req.fp))
        parts.append(client._forwarding or client.forwarding_lines(req))
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if req.upgrade and self.target.long_lived:
            parts.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % req.upgrade_to)
        parts.append(b"\r\n")
        return b"".join(parts)

    # --- upstream callbacks (Sink) ---------------------------------------------------------

    def on_upstream_head(self, status: int, reason: bytes, headers: list[Header]) -> None:
        if self.finished:
            return
        req = self.req
        client = self.client
        if status == 101 and not (req.upgrade and self.target.long_lived):
            # Switching protocols was never asked for here: don't hand the client a tunnel.
            client.ctx.upstream_error(self.target.prefix, "broken")
            self.fail(502, "upstream switched protocols unasked")
            return
        self.head_sent = True
        self.status = status
        fp = req.fp if status != 101 else None
        closing = not req.keep_alive or client.ctx.draining or req.version == "1.0"
        # Upstream heads repeat (most differ only by Date, once a second): the filtered and
        # formatted upstream part is made once per distinct head and request shape.
        key = (status, reason, fp is None, closing, req.upgrade, req.version, req.method, *headers)
        made = _HEAD_CACHE.get(key)
        if made is None:
            made = _upstream_head(status, reason, headers, req, fp, closing)
            if made[3]:
                if len(_HEAD_CACHE) >= _HEAD_CACHE_SIZE:
                    _HEAD_CACHE.clear()
                _HEAD_CACHE[key] = made
        head, self.chunked_out, close, _ = made
        self.close_after = close
        if fp is not None:
            head += firstparty.response_lines(fp)
        head += _HEAD_END[close]
        if status == 101:
            client.write(head)
        else:
            # Held back until the body (or the end) arrives in the same read: one TLS record
            # and one write for a whole small response. flush() sends it otherwise.
            self.pending = head

    def on_upstream_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_out += len(data)
        if self.target.long_lived:
            self.touch()
        if self.chunked_out:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.pending:
            data, self.pending = self.pending + data, b""
        self.client.write(data)

    def on_upstream_complete(self) -> None:
        if self.finished:
            return
        tail = b"0\r\n\r\n" if self.chunked_out else b""
        if self.pending or tail:
            transport = self.client.transport  # (ClientConnection.write, inlined)
            if transport is not None and not transport.is_closing():
                transport.write(self.pending + tail)
            self.pending = b""
        self._done(self.status, keep_alive=not self.close_after)

    def flush(self) -> None:
        """The upstream's read is over: send a head still held back (a streaming response)."""
        if self.pending and not self.finished:
            self.client.write(self.pending)
            self.pending = b""

    def on_upstream_upgraded(self, rest: bytes) -> None:
        if self.finished:
            return
        if rest:
            self.on_upstream_body(rest)
        assert self.conn is not None
        self.client.start_tunnel(self.conn)

    def on_upstream_lost(self, exc: BaseException | None) -> None:
        if self.finished:
            return
        if self.conn is not None and self.conn.tunnel:
            self._done(101, keep_alive=False)  # a tunnel ends when either side closes
            return
        req = self.req
        if isinstance(exc, UpstreamHeadTooLarge):  # not a stale connection: no retry
            self.client.ctx.upstream_error(self.target.prefix, "broken")
            proxy_log.warning("%s", exc, extra={"route": self.target.prefix})
            self.fail(502, "the upstream's response head is too large")
            return
        if (
            not self.head_sent
            and self.reused
            and not self.retried
            and req.complete
            and req.body_size <= REPLAY_LIMIT
            and self.pool is not None
        ):
            # A pooled connection the upstream had closed: try once on a fresh one.
            self.retried = True
            self.conn = None
            create_task(self._connect(self.pool, None), name="edgeproxy.retry")
            return
        self.client.ctx.upstream_error(self.target.prefix, "broken")
        self.fail(502, f"upstream closed the connection: {exc or 'EOF'}")

    def pause_client(self) -> None:
        self.client.pause_for_upstream()

    def resume_client(self) -> None:
        self.client.resume_for_upstream()

    # --- ending ----------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = self.client.loop.time()

    def _on_timeout(self) -> None:
        if self.finished:
            return
        if self.target.long_lived:
            client = self.client
            idle_limit = client.ctx.settings.proxy.long_lived_idle_timeout
            remaining = self.last_activity + idle_limit - client.loop.time()
            if remaining > 0.05:
                client._arm(remaining, self._on_timeout)
                return
        self.client.ctx.upstream_error(self.target.prefix, "timeout")
        if not self.req.complete and self.conn is not None:
            self.fail(408, "the request body did not arrive in time")
        else:
            err = UpstreamTimeout("upstream did not answer in time")
            self.fail(err.status_hint, err.message)

    def fail(self, status: int, message: str) -> None:
        """End the exchange with an edge error, or cut the client if the head already went."""
        if self.finished:
            return
        if self.head_sent:
            self._done(self.status, keep_alive=False, abort=True)
            return
        self._release(abort=True)
        self.finished = True
        self._cancel_timer()
        self.req.exchange = None
        self.client._respond(self.req, status, message)

    def on_client_lost(self) -> None:
        if not self.finished:
            self._done(499, keep_alive=False, abort=True)

    def _cancel_timer(self) -> None:
        if self.timer_armed:
            self.timer_armed = False
            self.client._disarm()

    def _release(self, abort: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        client = self.client
        if client._write_waiter is conn:
            # Paused for this client's slow reading: that pause must not travel into the pool.
            client._write_waiter = None
            if conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()
        if client._paused:  # (the call only when there is something to resume)
            client._resume(_PAUSE_UPSTREAM)
        if abort:
            conn.abort()
        elif self.pool is not None:
            self.pool.release(conn)

    def _done(self, status: int, *, keep_alive: bool, abort: bool = False) -> None:
        self.finished = True
        if self.timer_armed:  # (_cancel_timer, inlined: once per beacon)
            self.timer_armed = False
            self.client._on_deadline = None
        ctx = self.client.ctx
        now = time.perf_counter()
        ctx.observe_upstream(self.target.prefix, now - self.upstream_started)
        upstream = self.pool.url if self.pool is not None else None
        self._release(abort=abort or not self.req.complete)
        if abort and self.client.transport is not None:
            self.client.transport.abort()
        # The request and its exchange refer to each other: without this, every forwarded
        # request (and with it the connection and its TLS object) waits for the cycle
        # collector, instead of being freed when its last reference goes.
        self.req.exchange = None
        self.client.finish(
            self.req,
            status,
            keep_alive=keep_alive and not abort,
            upstream=upstream,
            bytes_out=self.bytes_out,
            now=now,
        )


_RESPONSE_DROP_FIRST_PARTY = HOP_BY_HOP | firstparty.REPLACED
_HEAD_CACHE: dict[tuple[Any, ...], tuple[bytes, bool, bool, bool]] = {}
_HEAD_CACHE_SIZE = 512
_HEAD_CACHE_ENTRY = 4096  # bytes of head and key: an upstream's odd huge head is made each time


def _upstream_head(
    status: int,
    reason: bytes,
    headers: list[Header],
    req: Request,
    fp: FirstParty | None,
    closing: bool,
) -> tuple[bytes, bool, bool, bool]:
    """The client's response head from the upstream's, up to the lines the edge adds:
    (status line and kept headers, chunked re-framing, close after, cacheable).

    One pass: hop-by-hop headers (and, with first-party, the CORS and caching headers the
    edge decides) dropped, upstream Set-Cookie Domains rewritten (then not cacheable: the
    rewrite is the domain's).
    """
    drop = _RESPONSE_DROP_FIRST_PARTY if fp is not None else HOP_BY_HOP
    out: list[Header] = []
    tokens: list[bytes] = []
    upgrade = b""
    bodiless = status in (204, 304) or req.method == b"HEAD"
    has_length = False
    cacheable = True
    for name, value in headers:
        low = name.lower()
        if low in drop:
            if low == b"connection":
                tokens += [t.strip().lower() for t in value.split(b",")]
            elif low == b"upgrade" and not upgrade:
                upgrade = value
            continue
        if low == b"set-cookie" and fp is not None:
            value = cookies.rewrite_domain(value, fp.policy)
            cacheable = False
        elif low == b"content-length":
            has_length = True
        out.append((name, value))
    if tokens:
        named = {t for t in tokens if t and t not in HOP_BY_HOP}
        if named:  # a header named in Connection is hop-by-hop too (RFC 9110 7.6.1)
            out = [(n, v) for n, v in out if n.lower() not in named]
            has_length = any(n.lower() == b"content-length" for n, _ in out)
    close = closing
    chunked = False
    if status == 101:
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade or b"websocket")]
        close = False
    elif not (bodiless or has_length):
        # Chunked or close-delimited upstream body: re-frame for this client.
        if req.version == "1.1":
            chunked = True
            out.append((b"Transfer-Encoding", b"chunked"))
        else:
            close = True
    if req.upgrade and status != 101:
        close = True  # the client's parser is past an upgrade request
    head = _status_and_headers(status, reason or _phrase(status), out)
    # The key holds the upstream's headers, dropped ones too: both are bounded.
    size = len(head) + sum(len(n) + len(v) for n, v in headers)
    return head, chunked, close, cacheable and size <= _HEAD_CACHE_ENTRY


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
