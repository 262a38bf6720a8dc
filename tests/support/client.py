"""A small raw HTTP/1.1-over-TLS client: tests need byte-level control (SNI vs Host,
pipelining, hop-by-hop headers) that high-level clients hide."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class Response:
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Collector:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.cur = Response()

    parser: httptools.HttpResponseParser

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()

    def on_status(self, reason: bytes) -> None:
        self.cur.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        self.cur.complete = True
        self.responses.append(self.cur)
        self.cur = Response()


class Conn:
    """One TLS connection to the edge with a given SNI name."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.collector = _Collector()
        self.parser = httptools.HttpResponseParser(self.collector)
        self.collector.parser = self.parser

    @classmethod
    async def open(cls, port: int, sni: str | None, ctx: ssl.SSLContext) -> Conn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=sni
        )
        return cls(reader, writer)

    def peer_cert(self) -> bytes:
        obj = self.writer.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True)

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def read_responses(self, n: int = 1, timeout: float = 10.0) -> list[Response]:
        async with asyncio.timeout(timeout):
            while len(self.collector.responses) < n:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.parser.feed_data(data)
        return self.collector.responses

    async def read_eof(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def build(
    method: str,
    target: str,
    host: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for n, v in headers or []:
        lines.append(f"{n}: {v}")
    if body and not any(
        n.lower() in ("content-length", "transfer-encoding") for n, _ in headers or []
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def request(
    port: int,
    sni: str,
    ctx: ssl.SSLContext,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection; returns the parsed response."""
    conn = await Conn.open(port, sni, ctx)
    try:
        conn.send(build(method, target, host or sni, headers, body))
        responses = await conn.read_responses(1, timeout)
        assert responses, "no response"
        return responses[0]
    finally:
        await conn.close()


async def forwarded(
    port: int, sni: str, ctx: ssl.SSLContext, upstream: Any, method: str, target: str, **kw: Any
) -> tuple[Response, Any]:
    """Send one request through the edge and return (response, what the upstream saw)
    (`upstream`: a tests.support.upstream.RawUpstream)."""
    n = len(upstream.seen)
    resp = await request(port, sni, ctx, method, target, **kw)
    seen = await asyncio.to_thread(upstream.wait_seen, n + 1)
    assert len(seen) == n + 1, "the upstream did not get the request"
    return resp, seen[n]
