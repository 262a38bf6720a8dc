"""Upstream connections: a keep-alive pool per upstream URL and the response-side protocol.

Rules:
- One request at a time per connection (no pipelining upstream); a connection goes back to
  the pool only after a complete response that allows keep-alive.
- Idle connections are reused newest first and closed after `upstream_keepalive_timeout`,
  shorter than common upstream keep-alive timeouts, so the edge rarely reuses a connection
  the upstream is closing.
- A connection whose peer closed while idle is never handed out.

Theory of operation: `UpstreamConnection` parses the response with llhttp (httptools) and
calls straight into its current `Sink` (the forwarder's exchange) from the parser
callbacks: no task hop and no copy between upstream bytes and the client's transport.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from edgeproxy.asyncio_utils import as_protocol
from edgeproxy.config import ProxySettings
from edgeproxy.errors import UpstreamTimeout, UpstreamUnavailable
from edgeproxy.logging import proxy_log
from edgeproxy.proxy.headers import Header


class Sink(Protocol):
    """What an upstream connection reports to while it carries one exchange."""

    def on_upstream_head(self, status: int, reason: bytes, headers: list[Header]) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_complete(self) -> None: ...
    def on_upstream_upgraded(self, rest: bytes) -> None: ...
    def on_upstream_lost(self, exc: BaseException | None) -> None: ...
    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def flush(self) -> None: ...


class _Desync(Exception):
    pass


MAX_HEAD_BYTES = 65536
"""An upstream response head longer than this is refused (502): llhttp sets no limit, and
a head is held in memory whole (nginx's equivalent, proxy_buffer_size, is 4-8 KiB)."""


class UpstreamHeadTooLarge(Exception):
    """The upstream's response head passed MAX_HEAD_BYTES: a broken upstream, not stale."""


class UpstreamConnection:
    __slots__ = (
        "pool",
        "transport",
        "parser",
        "sink",
        "closed",
        "tunnel",
        "idle_since",
        "_headers",
        "_reason",
        "_status",
        "_skip",
        "_reusable",
        "_head_only",
        "_head_bytes",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.closed = False
        self.tunnel = False
        self.idle_since = 0.0
        self._headers: list[Header] = []
        self._reason = b""
        self._status = 0
        self._skip = False
        self._reusable = False
        self._head_only = False
        self._head_bytes = -1
        """Bytes read since the exchange began while its response head is incomplete;
        -1 once the head is complete."""

    # --- driving one exchange --------------------------------------------------------------

    def start(self, sink: Sink, head_only: bool) -> None:
        """Attach the exchange that receives the next response (`head_only` for HEAD)."""
        self.sink = sink
        self._reusable = False
        self._head_only = head_only
        self._head_bytes = 0

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection: used when the exchange ends early (client gone, timeout)."""
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.sink is not None:
                self.sink.on_upstream_body(data)
            return
        if self.sink is None:
            # Bytes on an idle connection break HTTP framing: never reuse it.
            self.abort()
            return
        if self._head_bytes >= 0:  # reading a response head: count (an upper bound of) it
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self._head_bytes > MAX_HEAD_BYTES:  # still no end of the head
                raise self._head_too_large()
            if self.sink is not None:  # (None once the response is complete)
                self.sink.flush()
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            if self.sink is not None:
                self.sink.on_upstream_upgraded(data[exc.args[0] :])
        except (httptools.HttpParserError, UpstreamHeadTooLarge) as exc:
            sink = self.sink
            self.abort()
            cause = exc.__context__
            error: BaseException = exc
            if isinstance(cause, UpstreamHeadTooLarge):  # raised in on_headers_complete
                error = cause
            elif cause is not None and not isinstance(cause, httptools.HttpParserError | _Desync):
                proxy_log.error("error while relaying an upstream response", exc_info=cause)
            if sink is not None:
                sink.on_upstream_lost(error)

    def eof_received(self) -> bool | None:
        return False  # close our side too: half-open upstreams are not reused

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._status and not self.tunnel and exc is None and not self._framed():
            sink.on_upstream_complete()  # a close-delimited body ends at a clean EOF
        else:
            sink.on_upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_client()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_client()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.sink is None:
            # Bytes after a complete response: this connection is out of step with its
            # upstream, and those bytes must never be read as the next client's response.
            raise _Desync
        self._headers = []
        self._reason = b""
        self._status = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        # Interim 1xx answers (103 Early Hints) are dropped: the client gets the final one.
        self._skip = 100 <= status < 200 and status != 101
        if self._skip or self.sink is None:
            return
        if self._head_bytes > MAX_HEAD_BYTES:  # the count includes the read's body bytes
            size = len(self._reason) + sum(len(n) + len(v) + 4 for n, v in self._headers)
            if size > MAX_HEAD_BYTES:
                raise self._head_too_large()
        self._head_bytes = -1
        self._status = status
        self.sink.on_upstream_head(status, self._reason, self._headers)
        if self._head_only and self.sink is not None:
            # llhttp cannot be told the request was HEAD, so it would wait for a body the
            # upstream never sends: finish here and retire the connection.
            sink, self.sink = self.sink, None
            self._status = 0
            sink.on_upstream_complete()
            self.abort()

    def _head_too_large(self) -> UpstreamHeadTooLarge:
        return UpstreamHeadTooLarge(
            f"upstream {self.pool.url} sent a response head over {MAX_HEAD_BYTES} bytes"
        )

    def _framed(self) -> bool:
        """Whether the response in progress says where its body ends (else EOF ends it)."""
        return (
            self._status in (101, 204, 304)
            or self._head_only
            or any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)
        )

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        if self._status == 101:
            return  # the tunnel starts when the parser raises HttpParserUpgrade
        sink, self.sink = self.sink, None
        self._status = 0
        self._reusable = self.parser.should_keep_alive()
        if sink is not None:
            sink.on_upstream_complete()


class UpstreamPool:
    """Keep-alive connections to one upstream URL (`http://host:port[/base]`)."""

    def __init__(self, url: str, settings: ProxySettings) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/").encode()
        default_port = 443 if parts.scheme == "https" else 80
        self.authority = parts.netloc.encode() if parts.port != default_port else self.host.encode()
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.settings = settings
        self.idle: list[UpstreamConnection] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Cached: get_running_loop() is a getpid(2) syscall on Python 3.11.
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
        return self._event_loop

    async def connect(self) -> UpstreamConnection:
        """Open a new connection.

        Raises:
            UpstreamUnavailable: refused, unreachable, or TLS to the upstream failed.
            UpstreamTimeout: no connection within `connect_timeout`.
        """
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await loop.create_connection(
                    lambda: as_protocol(conn),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream {self.url} did not accept a connection within "
                f"{self.settings.connect_timeout:g} s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"upstream {self.url} refused the connection: {exc}") from exc
        return conn

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still open, or None."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Take a connection back after its exchange: pool it if it can carry another."""
        if (
            not conn._reusable  # the response ended and said keep-alive
            or conn.closed
            or conn.tunnel
            or len(self.idle) >= self.settings.upstream_max_idle
        ):
            if not conn.closed:
                conn.abort()
            return
        loop = self._event_loop or self._loop()
        conn.idle_since = loop.time()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(
                self.settings.upstream_keepalive_timeout / 2, self._sweep
            )

    def _sweep(self) -> None:
        self._sweeper = None
        if not self.idle:
            return
        loop = self._loop()
        cutoff = loop.time() - self.settings.upstream_keepalive_timeout
        keep = []
        for conn in self.idle:
            if conn.idle_since < cutoff or conn.closed:
                conn.abort()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            self._sweeper = loop.call_later(
                self.settings.upstream_keepalive_timeout / 2, self._sweep
            )

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
