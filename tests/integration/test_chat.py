"""The long-lived /chat route: a WebSocket tunnel and a long poll past response_timeout."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.conftest import DOMAINS
from tests.support.client import Conn, build, request

HOST = DOMAINS[1]


async def test_websocket_echo_through_chat(edge, client_ctx):
    """Upgrade: websocket on /chat becomes a two-way tunnel to the upstream."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"https://127.0.0.1:{edge.port}/chat/ws",
            ssl=client_ctx,
            server_hostname=HOST,
            headers={"Host": HOST},
        ) as ws:
            for i in range(3):
                await ws.send_str(f"hello {i}")
                assert (await ws.receive_str(timeout=5)) == f"echo:hello {i}"
            payload = bytes(range(256)) * 300  # 76 KiB, several TLS records
            await ws.send_bytes(payload)
            assert (await ws.receive_bytes(timeout=5)) == payload


async def test_websocket_upgrade_is_not_tunnelled_on_beacon_routes(edge, upstream, client_ctx):
    """On /track an Upgrade header is hop-by-hop: dropped, and the request is plain HTTP."""
    n = len(upstream.seen)
    resp = await request(
        edge.port,
        HOST,
        client_ctx,
        "GET",
        "/track/ws",
        headers=[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    assert resp.status == 200
    seen = upstream.wait_seen(n + 1)[n]
    assert seen.header(b"upgrade") == [] and seen.header(b"connection") == []


async def test_streamed_response_arrives_as_it_is_written(edge, client_ctx):
    """An event stream is relayed chunk by chunk, not buffered until the end."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("GET", "/chat/stream", HOST))
    start = time.monotonic()
    async with asyncio.timeout(5):
        while b"tick 0" not in conn.collector.cur.body:
            conn.parser.feed_data(await conn.reader.read(4096))
    first = time.monotonic() - start
    [resp] = await conn.read_responses(1)
    await conn.close()
    assert first < 0.4  # the upstream takes 1.5 s for all three
    assert resp.body == b"".join(b"data: tick %d\n\n" % i for i in range(3))


@pytest.mark.slow
async def test_30_second_long_poll_through_chat(edge, client_ctx):
    """A 30 s long poll on /chat outlives the beacon response_timeout (1.5 s here)."""
    start = time.monotonic()
    resp = await request(edge.port, HOST, client_ctx, "GET", "/chat/poll?s=30", timeout=45)
    assert resp.status == 200
    assert resp.body == b'{"polled": true}'
    assert time.monotonic() - start >= 30
