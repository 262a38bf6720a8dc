"""Real upstream servers on loopback, run on their own event loop in a thread so that
module-scoped edge processes can use them across tests.

`RawUpstream` speaks HTTP/1.1 byte by byte (httptools) so tests control and see exact
bytes; `AiohttpUpstream` serves the WebSocket echo and the long poll.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools
from aiohttp import WSMsgType, web


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class _RawProtocol(asyncio.Protocol):
    def __init__(self, owner: RawUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.cur: Seen | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.owner.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.cur = Seen(b"", b"", [], b"", False)

    def on_url(self, url: bytes) -> None:
        assert self.cur
        self.cur.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.cur
        self.cur.headers.append((name, value))
        if name.lower() == b"transfer-encoding":
            self.cur.chunked = True

    def on_headers_complete(self) -> None:
        assert self.cur
        self.cur.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        assert self.cur
        self.cur.body += body

    def on_message_complete(self) -> None:
        seen, self.cur = self.cur, None
        assert seen is not None
        self.owner.seen.append(seen)
        asyncio.get_running_loop().create_task(self.owner.respond(self, seen))


class RawUpstream:
    """Paths (under any route) choose the answer:
    /x/slow?ms=N  wait N ms; /x/hop  hop-by-hop response headers; /x/cookies  two Set-Cookie;
    /x/chunked  chunked body; /x/close  close-delimited body; /x/status?code=N;
    /x/dropfirst?id=K  the first request with K is read, then its connection closed unanswered
    (what a pooled connection the upstream had closed looks like); /x/bighead[?whole=1]  a
    160 KiB response head, in 4 KiB writes (or one); /x/bigbody  a 1 MiB body written with
    its head; else 200 "ok".
    """

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.seen: list[Seen] = []
        self.dropped: set[str] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _RawProtocol(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def start(self) -> RawUpstream:
        self.lt.run(self._start())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_seen(self, n: int, timeout: float = 5.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.seen

    async def respond(self, proto: _RawProtocol, seen: Seen) -> None:
        t = proto.transport
        assert t is not None
        parts = urlsplit(seen.target.decode("latin-1"))
        path, query = parts.path, parse_qs(parts.query)
        last = path.rsplit("/", 1)[-1]
        if last == "slow":
            await asyncio.sleep(int(query.get("ms", ["1000"])[0]) / 1000)
        if t.is_closing():
            return
        if last == "dropfirst" and query.get("id", [""])[0] not in self.dropped:
            self.dropped.add(query.get("id", [""])[0])
            t.close()
            return
        if last == "bighead":  # a response head over the edge's limit: many writes or one
            head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 163840 + b"\r\nContent-Length: 2\r\n\r\n"
            if query.get("whole"):
                t.write(head + b"ok")
                return
            for i in range(0, len(head), 4096):
                t.write(head[i : i + 4096])
                await asyncio.sleep(0.001)
            t.write(b"ok")
            return
        if last == "bigbody":  # head and a 1 MiB body, in one write
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"b" * 1048576)
            return
        if last == "hop":
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop-Secret\r\n"
                b"X-Hop-Secret: s3cret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                b"Trailer: X-Trail\r\nX-End-To-End: kept\r\n\r\nok"
            )
        elif last == "cookies":
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1; Path=/; HttpOnly\r\n"
                b"Set-Cookie: b=2, with comma; Path=/\r\n\r\nok"
            )
        elif last == "chunked":
            t.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
            )
        elif last == "close":
            t.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof")
            t.close()
        elif last == "upcookies":
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                b"Set-Cookie: a=1; Domain=backend.internal; Path=/\r\n"
                b"Set-Cookie: b=2; path=/; domain=.other.test; Secure\r\n"
                b"Set-Cookie: c=3; Path=/\r\n"
                b"Access-Control-Allow-Origin: *\r\nCache-Control: max-age=3600\r\n\r\nok"
            )
        elif last == "extra":
            # a complete response, then the start of another nobody asked for
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Evil: 1\r\n"
            )
            await asyncio.sleep(0.2)
            if not t.is_closing():
                t.write(b"\r\nsmuggled!!!")
        elif last == "switch":
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nraw tunnel bytes"
            )
        elif last == "status":
            code = int(query.get("code", ["200"])[0])
            t.write(b"HTTP/1.1 %d Custom Reason\r\nContent-Length: 0\r\n\r\n" % code)
        elif seen.method == b"HEAD":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Head: yes\r\n\r\n")
        else:
            n = len(self.seen)
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                b"X-Upstream-Seq: %d\r\nX-Upstream-Port: %d\r\n\r\nok" % (n, self.port)
            )

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class AiohttpUpstream:
    """/chat/ws echoes WebSocket messages; /chat/poll?s=N answers after N seconds."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def _start(self) -> None:
        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    await sock.send_str("echo:" + msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await sock.send_bytes(msg.data)
            return sock

        async def poll(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("s", "1")))
            return web.json_response({"polled": True})

        async def stream(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: tick {i}\n\n".encode())
                await asyncio.sleep(0.5)
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/chat/stream", stream)
        app.router.add_get("/chat/ws", ws)
        app.router.add_get("/chat/poll", poll)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> AiohttpUpstream:
        self.lt.run(self._start())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.runner is not None:
            self.lt.run(self.runner.cleanup())
