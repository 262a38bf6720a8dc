"""Hostile clients and misbehaving upstreams: each case a bug a review found, kept fixed."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest

from tests.conftest import DOMAINS
from tests.integration.conftest import base_config
from tests.support.client import Conn, build, request
from tests.support.edge import Edge

HOST = DOMAINS[0]


async def _exchange(edge, client_ctx, raw: bytes, n: int = 1, timeout: float = 10.0):
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(raw)
    try:
        return await conn.read_responses(n, timeout)
    finally:
        await conn.close()


async def test_connection_naming_content_length_cannot_smuggle(edge, upstream, client_ctx):
    """`Connection: Content-Length` must not strip the framing the upstream reads."""
    n = len(upstream.seen)
    inner = b"GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (
        build(
            "POST",
            "/track/a",
            HOST,
            [("Content-Length", str(len(inner))), ("Connection", "Content-Length")],
        )
        + inner
    )
    [resp] = await _exchange(edge, client_ctx, raw)
    await asyncio.sleep(0.2)
    seen = upstream.seen[n:]
    assert resp.status == 200
    assert [(s.method, s.target) for s in seen] == [(b"POST", b"/track/a")]
    assert seen[0].body == inner


async def test_chunked_trailers_never_reach_the_forwarded_head(edge, upstream, client_ctx):
    n = len(upstream.seen)
    raw = (
        build("POST", "/track", HOST, [("Transfer-Encoding", "chunked")])
        + b"2\r\nhi\r\n0\r\nHost: t.beta.test\r\nX-Injected: yes\r\n\r\n"
    )
    [resp] = await _exchange(edge, client_ctx, raw)
    seen = upstream.wait_seen(n + 1)[n]
    assert resp.status == 200
    assert seen.header(b"host") == [HOST.encode()]
    assert seen.header(b"x-injected") == []


async def test_absolute_form_forwards_the_checked_authority(edge, upstream, client_ctx):
    n = len(upstream.seen)
    raw = (f"GET https://{HOST}/track/a HTTP/1.1\r\nHost: {DOMAINS[1]}\r\n\r\n").encode()
    [resp] = await _exchange(edge, client_ctx, raw)
    seen = upstream.wait_seen(n + 1)[n]
    assert resp.status == 200
    assert seen.header(b"host") == [HOST.encode()] and seen.target == b"/track/a"


@pytest.mark.parametrize(
    "host", [f"{HOST}:1@t.beta.test", f"{HOST}:/../evil", f"{HOST} x", f"{HOST}:99999999"]
)
async def test_malformed_host_is_400(edge, upstream, client_ctx, host):
    n = len(upstream.seen)
    [resp] = await _exchange(edge, client_ctx, build("GET", "/track", host))
    assert resp.status == 400
    assert len(upstream.seen) == n


async def test_long_pipeline_of_edge_answers(edge, client_ctx):
    """400 pipelined 404s behind a slow forwarded request: every answer arrives, in order."""
    raw = build("GET", "/track/slow?ms=300", HOST) + build("GET", "/nope", HOST) * 400
    responses = await _exchange(edge, client_ctx, raw, n=401, timeout=20)
    assert [r.status for r in responses] == [200] + [404] * 400
    deadline = time.monotonic() + 5
    while edge.sample("edgeproxy_connections_active") != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert edge.sample("edgeproxy_connections_active") == 0


async def test_partial_pipelined_request_is_timed_out(edge, client_ctx):
    """A request head left half-written behind a forwarded one still gets header_timeout."""
    start = time.monotonic()
    raw = build("GET", "/track/slow?ms=200", HOST) + b"GET /track/x HTTP/1.1\r\nHo"
    responses = await _exchange(edge, client_ctx, raw, n=2, timeout=8)
    assert [r.status for r in responses] == [200, 408]
    assert time.monotonic() - start < 5


async def test_endless_header_value_is_cut_at_the_limit(edge, client_ctx):
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(b"GET /track HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Big: ")
    try:
        for _ in range(64):  # up to 4 MiB; the edge must stop it long before
            conn.send(b"a" * 65536)
            await conn.writer.drain()
            if conn.reader.at_eof() or conn.collector.responses:
                break
            await asyncio.sleep(0)
    except (ConnectionError, OSError):
        pass
    responses = await conn.read_responses(1, timeout=5)
    await conn.close()
    assert responses and responses[0].status == 431


async def test_pipelined_chunked_body_over_the_limit_is_413(edge, upstream, client_ctx):
    chunk = b"x" * 32768
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    raw = (
        build("GET", "/track/slow?ms=200", HOST)
        + build("POST", "/track/big", HOST, [("Transfer-Encoding", "chunked")])
        + body
    )
    n = len(upstream.seen)
    responses = await _exchange(edge, client_ctx, raw, n=2)
    assert [r.status for r in responses] == [200, 413]
    await asyncio.sleep(0.1)
    assert [s.target for s in upstream.seen[n:]] == [b"/track/slow?ms=200"]


async def test_unknown_transfer_coding_is_501(edge, upstream, client_ctx):
    n = len(upstream.seen)
    raw = build("POST", "/track", HOST, [("Transfer-Encoding", "gzip, chunked")]) + b"0\r\n\r\n"
    [resp] = await _exchange(edge, client_ctx, raw)
    assert resp.status == 501
    assert len(upstream.seen) == n


async def test_upstream_bytes_after_a_response_never_reach_another_client(edge, client_ctx):
    first = await request(edge.port, HOST, client_ctx, "GET", "/track/extra")
    others = [await request(edge.port, HOST, client_ctx, "GET", "/track") for _ in range(5)]
    assert first.status == 200 and first.body == b"ok"
    for r in others:
        assert r.status == 200 and r.body == b"ok" and r.header(b"x-evil") == []


async def test_upstream_switching_protocols_unasked_is_502(edge, client_ctx):
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/switch")
    assert resp.status == 502


def _never_reading(edge, client_ctx) -> ssl.SSLSocket:
    """A TLS connection whose client reads nothing, with a receive buffer that fills fast."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect, to count)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", edge.port))
    tls = client_ctx.wrap_socket(raw, server_hostname=HOST)
    tls.setblocking(False)
    return tls


def _send_for(tls: ssl.SSLSocket, seconds: float) -> None:
    """Pipelines requests the edge answers itself (404s), never reading the answers."""
    chunk = build("GET", "/nope", HOST) * 200
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            tls.send(chunk)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            time.sleep(0.005)


def test_a_client_that_never_reads_is_not_read_either(edge, client_ctx):
    """A client pipelining requests and never reading the answers: once its write buffer is
    full the edge stops reading it, so the answers don't pile up in the worker (a review's
    fuzzing took a worker past 1 GB in 15 s)."""
    tls = _never_reading(edge, client_ctx)
    try:
        _send_for(tls, 2.0)
        time.sleep(0.5)  # (access lines are written a few times a second)
        answered = len(edge.access())
        _send_for(tls, 1.5)
        time.sleep(0.5)
        more = len(edge.access()) - answered
        assert answered > 1000, answered  # (it did answer until the buffers were full)
        assert more < 50, f"{more} more answered while the client read nothing"
    finally:
        tls.close()


@pytest.mark.parametrize("send_timeout", [1.0, 60.0])
def test_a_client_that_takes_nothing_is_cut_off_after_send_timeout(
    tmp_path, certs_dir, upstream, chat_upstream, trust_bundle, client_ctx, send_timeout
):
    """Answers wait for a client that takes none of them: after server.send_timeout it is
    cut off, instead of holding its connection (and what waits) for ever."""
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["server"]["send_timeout"] = send_timeout
    edge = Edge(tmp_path, config).start()
    tls = _never_reading(edge, client_ctx)
    try:
        try:
            _send_for(tls, 1.0)
        except OSError:
            pass  # (cut off while sending)
        deadline = time.monotonic() + 3.0
        while edge.sample("edgeproxy_connections_active") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        cut = edge.sample("edgeproxy_connections_active") == 0
        assert cut == (send_timeout < 3.0), send_timeout
    finally:
        tls.close()
        assert edge.stop() == 0
