"""A bare TLS relay on uvloop's TLS + CPython ssl, with no HTTP at all.

Bytes from each TLS client go unparsed to an upstream connection of its own and back. It
serves no product (no routing, limits, headers, cookies, metrics): it was the ceiling of
the stack edgeproxy ran on until it served TLS from the socket itself, compiled
(edgeproxy/tls/transport.py), and bench/run.py still measures it beside edgeproxy and nginx
to show what uvloop's TLS alone costs. It uses edgeproxy's TLS policy (ciphers, ALPN,
tickets), so handshakes are alike; unlike edgeproxy it opens a new upstream connection per
client connection (it can't pool without parsing), which counts against it in the
handshake scenarios.

    python bench/relay.py PORT UPSTREAM_PORT FULLCHAIN PRIVKEY
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgeproxy.tls.sni import new_server_context  # noqa: E402

LOOP = "127.0.0.1"


class Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(
            lambda: Upstream(self.transport), LOOP, self.upstream_port
        )
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(port: int, upstream_port: int, fullchain: str, privkey: str) -> None:
    ctx = new_server_context()
    ctx.load_cert_chain(fullchain, privkey)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port), LOOP, port, ssl=ctx)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, upstream_port, fullchain, privkey = sys.argv[1:5]
    uvloop.run(main(int(port), int(upstream_port), fullchain, privkey))
