"""TLS connections served from the socket itself: OpenSSL reads and writes the descriptor.

Where the C connections are built and fit (tls/native.py, tls/_conn.c: the same rules, in
C), they serve instead; this module serves wherever they can't, and is the reference for
what a client connection does.

Why not the event loop's TLS (uvloop's SSLProtocol, asyncio's sslproto): it runs OpenSSL
on memory BIOs, so every record goes socket -> loop buffer -> BIO -> plaintext and back,
and each connection builds two BIOs, an ssl.SSLObject (Python frames) and an SSL state
machine of its own. Here a connection is `ssl._SSLSocket` (the C object behind
ssl.SSLSocket) on a non-blocking socket, driven by the loop's reader and writer callbacks,
and this module is compiled with the beacon path (setup.py). Measured against uvloop's TLS,
both compiled, pinned A/B: 1.13x keep-alive beacons, 1.08x full and 1.03x resumed
handshakes per CPU-second. (Uncompiled it lost 4% on keep-alive: OpenSSL without read-ahead
reads a record in two syscalls, and Python frames replaced uvloop's Cython.)

Rules:
- The protocol is made only after the handshake succeeds; a handshake that fails or outlasts
  `handshake_timeout` is tallied (tls/sni.HandshakeTally) and closed, unseen by the proxy.
- OpenSSL without read-ahead reads exactly one record per SSL_read, so a read of RECORD
  bytes never leaves plaintext buffered inside OpenSSL: the socket's readiness is the only
  signal needed, and pause_reading can simply stop watching it.
- write() hands data to SSL_write at once. What the socket doesn't take waits, in order (a
  retried SSL_write must get the same bytes); the protocol is paused above WRITE_HIGH bytes
  waiting and resumed at WRITE_LOW.
- close() sends what waits, then close_notify. When the client has sent more than was read,
  or the protocol is mid-request (`reading_request`), it then sends a FIN and reads and
  discards until the client closes too, for at most LINGER seconds: closing a socket with
  unread bytes makes the kernel send a reset, which can destroy the response still in
  flight (a 413 to an upload not read, the last answer of a pipeline). Otherwise it closes
  at once, as nginx does. connection_lost comes when the data is out, not after the linger.
- abort() drops what waits and closes at once.
- A client that takes none of what waits for it for `send_timeout` seconds is cut off (as
  abort()), closing or not: a client that stops reading can't hold a connection forever.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgeproxy.logging import server_log
from edgeproxy.tls.connsocket import ConnSocket
from edgeproxy.tls.sni import HandshakeTally

RECORD = 16384
"""The largest TLS record's plaintext: one SSL_read returns at most this much."""
READS_PER_EVENT = 8
"""Full records read per readiness event before other connections get their turn."""
WRITE_HIGH = 65536
WRITE_LOW = 16384
LINGER = 2.0
"""How long a closed connection reads (and drops) what its client still sends."""
ACCEPT_BACKOFF = 0.1
"""Out of file descriptors: accepting pauses this long instead of spinning on the error."""

_HANDSHAKE, _OPEN, _CLOSING, _LINGER, _CLOSED = range(5)

ProtocolFactory = Callable[[], asyncio.Protocol]


class TLSListener:
    """Accepts on a listening socket and starts a TLSTransport for every connection."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        factory: ProtocolFactory,
        *,
        deadlines: HandshakeDeadlines,
        tally: HandshakeTally,
        send_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.family = int(sock.family)
        self.ctx = ctx
        self.factory = factory
        self.deadlines = deadlines
        self.tally = tally
        self.send_timeout = send_timeout
        self.accepting = False
        self.closed = False
        self._last_warning = -60.0

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        self.accepting = True

    def close(self) -> None:
        """Stop accepting for good (the socket itself belongs to the supervisor)."""
        self.closed = True
        self._pause()

    def _pause(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        # One connection per readiness event, as nginx does by default: the listener stays
        # ready while more wait, and a batch would end in one more accept that fails.
        try:  # (not accept(): that makes a socket.socket, see tls/connsocket.py)
            fd, addr = self.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._warn(exc)
                self._pause()
                self.loop.call_later(ACCEPT_BACKOFF, self._resume)
            return  # (ECONNABORTED and the like: that connection is gone, not the listener)
        conn = ConnSocket(self.family, socket.SOCK_STREAM, 0, fd)
        serve_tls(
            self.loop,
            conn,
            addr,
            self.ctx,
            self.factory,
            self.tally,
            self.deadlines,
            self.send_timeout,
        )

    def _resume(self) -> None:
        if not self.accepting and not self.closed:  # (a drain may have closed it meanwhile)
            self.start()

    def _warn(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:  # at most a line a minute under a flood
            self._last_warning = now
            server_log.warning("accept failed: %s; pausing accepts for %.1f s", exc, ACCEPT_BACKOFF)


def serve_tls(
    loop: asyncio.AbstractEventLoop,
    conn: _socket.socket,
    peer: Any,
    ctx: ssl.SSLContext,
    factory: ProtocolFactory,
    tally: HandshakeTally,
    deadlines: HandshakeDeadlines,
    send_timeout: float,
) -> None:
    """Start the handshake on an accepted connection (a listener's, or one that came with
    a PROXY header); its protocol is made once the handshake succeeds."""
    try:
        transport = TLSTransport(loop, conn, peer, ctx, factory, tally, send_timeout)
    except OSError:  # reset before we got to it
        conn.close()
        return
    transport.start(deadlines)


class HandshakeDeadlines:
    """Closes handshakes that outlast `timeout`, with one loop timer for all of them.

    A timer per connection (call_later, then cancel) costs ~3 us even in a hot loop. All
    handshakes get the same timeout, so the oldest pending one always expires first: the
    timer is set for it, and moved on to the next oldest when it fires.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.pending: dict[TLSTransport, float] = {}  # insertion order is deadline order
        self._timer: asyncio.TimerHandle | None = None

    def add(self, transport: TLSTransport) -> None:
        self.pending[transport] = deadline = self.loop.time() + self.timeout
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._expire)

    def discard(self, transport: TLSTransport) -> None:
        self.pending.pop(transport, None)

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        pending = self.pending
        expired: list[TLSTransport] = []
        next_deadline = 0.0
        for transport, deadline in pending.items():
            if deadline > now + 0.001:  # (libuv timers have ms resolution: no spinning)
                next_deadline = deadline
                break
            expired.append(transport)
        for transport in expired:
            del pending[transport]
            transport._handshake_timed_out()
        if pending:
            self._timer = self.loop.call_at(next_deadline, self._expire)


class TLSTransport(asyncio.Transport):
    """One client connection: handshake, then an asyncio transport for its protocol."""

    __slots__ = (
        "_loop",
        "_sock",
        "_fd",
        "_peer",
        "_ssl",
        "_factory",
        "_tally",
        "_protocol",
        "_state",
        "_deadlines",
        "_timer",
        "_send_timer",
        "_send_timeout",
        "_progress",
        "_reading",
        "_watching",
        "_writing",
        "_wbuf",
        "_wsize",
        "_write_paused",
        "_read_wants_write",
        "edge_sni",
        "__weakref__",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: _socket.socket,
        peer: Any,
        ctx: ssl.SSLContext,
        factory: ProtocolFactory,
        tally: HandshakeTally,
        send_timeout: float,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._factory = factory
        self._tally = tally
        self._protocol: asyncio.Protocol | None = None
        self._state = _HANDSHAKE
        self._deadlines: HandshakeDeadlines | None = None
        self._timer: asyncio.TimerHandle | None = None  # the linger's
        self._send_timer: asyncio.TimerHandle | None = None  # while data waits
        self._send_timeout = send_timeout
        self._progress = 0.0  # when the client last took some of what waits
        self._reading = True  # the protocol wants data (pause_reading/resume_reading)
        self._watching = False  # the reader callback is registered
        self._writing = False  # the writer callback is registered
        self._wbuf: deque[bytes] = deque()
        self._wsize = 0
        self._write_paused = False
        self._read_wants_write = False
        self.edge_sni = ""  # set by the SNI callback (tls/sni.SNI_ATTR)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The C object OpenSSL drives on this socket; `owner` is what the SNI callback gets.
        self._ssl: Any = ctx._wrap_socket(  # type: ignore[attr-defined]
            sock, server_side=True, owner=self
        )

    def start(self, deadlines: HandshakeDeadlines) -> None:
        # The ClientHello is usually not there yet at accept: wait for it, don't try a read.
        self._deadlines = deadlines
        deadlines.add(self)
        self._watch()

    # --- what the SNI callback sees (tls/sni.install_sni_callback) ------------------------

    @property
    def context(self) -> ssl.SSLContext:
        return self._ssl.context  # type: ignore[no-any-return]

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._ssl.context = ctx

    # --- the handshake ---------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._unwatch_write()
            return
        except ssl.SSLWantWriteError:  # the send buffer is full mid-flight: go on when it drains
            self._watch_write()
            return
        except (ssl.SSLError, OSError):  # refused by SNI, a protocol error, a reset
            self._tally.failed()
            self._close_now(None)
            return
        self._forget_deadline()
        self._unwatch_write()
        self._state = _OPEN
        self._tally.ok()
        self._protocol = protocol = self._factory()
        protocol.connection_made(self)
        # No read now: the request is rarely in yet, and the reader (still registered, level
        # triggered) calls as soon as it is.

    def _forget_deadline(self) -> None:
        deadlines = self._deadlines
        if deadlines is not None:
            self._deadlines = None
            deadlines.discard(self)

    def _handshake_timed_out(self) -> None:
        self._deadlines = None
        if self._state == _HANDSHAKE:
            self._tally.failed()
            self._close_now(None)

    # --- reading ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        state = self._state
        if state != _OPEN:
            if state == _HANDSHAKE:
                self._handshake()
            elif state == _LINGER:
                self._linger_read()
            return
        read = self._ssl.read
        protocol: Any = self._protocol
        for _ in range(READS_PER_EVENT):
            try:
                data = read(RECORD)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # OpenSSL must answer something first (key update)
                self._read_wants_write = True
                self._watch_write()
                return
            except (ssl.SSLEOFError, ConnectionResetError):  # a close without close_notify
                data = b""
            except (ssl.SSLError, OSError) as exc:
                self._close_now(exc)
                return
            if not data:
                self._on_eof()
                return
            protocol.data_received(data)
            if len(data) < RECORD or not self._reading or self._state != _OPEN:
                return

    def _on_eof(self) -> None:
        self._unwatch()
        keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
        if not keep_open:  # (a TLS half-close can't be kept: the protocol may only write)
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self._state == _OPEN:
                self._unwatch()

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if self._state == _OPEN:
                self._watch()

    def is_reading(self) -> bool:
        return self._reading and self._state == _OPEN

    # --- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return  # (as asyncio's transports: writes after close() are dropped)
        if self._wbuf:
            self._queue(bytes(data))
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._queue(bytes(data))  # OpenSSL keeps its part: the retry sends the same bytes
            self._watch_write()
        except (ssl.SSLError, OSError) as exc:
            self._close_now(exc)

    def _queue(self, data: bytes) -> None:
        if not self._wbuf:  # the first to wait: the client has send_timeout to take some
            self._progress = self._loop.time()
            if self._send_timer is None:
                self._send_timer = self._loop.call_later(self._send_timeout, self._check_send)
        self._wbuf.append(data)
        self._wsize += len(data)
        if not self._write_paused and self._wsize > WRITE_HIGH:
            self._write_paused = True
            self._protocol.pause_writing()  # type: ignore[union-attr]

    def _on_writable(self) -> None:
        state = self._state
        if state == _HANDSHAKE:
            self._handshake()
            return
        buf = self._wbuf
        write = self._ssl.write
        while buf:
            try:
                write(buf[0])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except (ssl.SSLError, OSError) as exc:
                self._close_now(exc)
                return
            self._wsize -= len(buf.popleft())
            self._progress = self._loop.time()
            if self._write_paused and self._wsize <= WRITE_LOW:
                self._write_paused = False
                self._protocol.resume_writing()  # type: ignore[union-attr]
                if self._state not in (_OPEN, _CLOSING):
                    return
        if self._read_wants_write:
            self._read_wants_write = False
            if self._reading:
                self._on_readable()
            if self._read_wants_write or self._state not in (_OPEN, _CLOSING):
                return
            if self._wbuf:
                return  # the protocol wrote more meanwhile: still watched, goes on
        self._unwatch_write()
        if self._state == _CLOSING:
            self._shutdown()

    def _check_send(self) -> None:
        self._send_timer = None
        if not self._wbuf or self._state not in (_OPEN, _CLOSING):
            return
        idle = self._loop.time() - self._progress
        if idle < self._send_timeout - 0.001:
            self._send_timer = self._loop.call_later(self._send_timeout - idle, self._check_send)
            return
        self._close_now(TimeoutError(f"the client took nothing for {self._send_timeout:g} s"))

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return WRITE_LOW, WRITE_HIGH

    def can_write_eof(self) -> bool:
        return False

    # --- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._state != _OPEN

    def close(self) -> None:
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        if self._wbuf:
            self._unwatch()  # nothing more reaches the protocol; _on_writable goes on
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        """Everything is written: close_notify, then close or linger (module docstring)."""
        self._state = _LINGER  # (from here on, the protocol has had its connection_lost)
        # A protocol in the middle of reading a request (a refused upload) knows more is
        # coming, whatever the socket holds this very moment.
        unread = bool(getattr(self._protocol, "reading_request", False))
        self._loop.call_soon(self._lost, None)
        try:
            # Sends close_notify, then reads once for the client's: without read-ahead that
            # read shows whether the client sent anything else (OpenSSL: application data
            # after close_notify).
            self._ssl.shutdown()
        except (ssl.SSLWantReadError, ssl.SSLEOFError, ssl.SSLSyscallError, ConnectionError):
            # Nothing more from the client, or it has closed: nothing for a reset to destroy.
            if not unread:
                self._close_now(None)
                return
        except (ssl.SSLError, OSError):
            pass  # it sent more than we read (a body not read, a pipelined request): linger
        else:
            self._close_now(None)  # its close_notify came too
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(None)
            return
        self._unwatch_write()
        self._timer = self._loop.call_later(LINGER, self._close_now, None)
        self._watch()  # (usually still watched: close() leaves it when nothing waits)

    def _linger_read(self) -> None:
        try:
            while self._sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close_now(None)  # the client closed (or reset): done

    def abort(self) -> None:
        self._close_now(None)

    def _close_now(self, exc: Exception | None) -> None:
        state = self._state
        if state == _CLOSED:
            return
        self._state = _CLOSED
        self._unwatch()
        self._unwatch_write()
        self._forget_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._wbuf.clear()
        self._wsize = 0
        self._sock.close()
        if self._protocol is not None and state in (_OPEN, _CLOSING):
            self._loop.call_soon(self._lost, exc)  # (from _LINGER it is called already)

    def _lost(self, exc: Exception | None) -> None:
        protocol, self._protocol = self._protocol, None  # (it refers back to us: no cycle left)
        if protocol is not None:
            protocol.connection_lost(exc)

    # --- the loop's callbacks --------------------------------------------------------------

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)

    def _watch_write(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _unwatch_write(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    # --- the rest of asyncio's Transport ---------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sni":
            return self.edge_sni
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
