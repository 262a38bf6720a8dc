"""Forwarding through a running edge to a real upstream: faithful, limited, fast to fail."""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid

import pytest

from tests.conftest import DOMAINS
from tests.integration.conftest import base_config
from tests.support.client import Conn, build, forwarded, request
from tests.support.edge import Edge
from tests.support.upstream import RawUpstream

HOST = DOMAINS[0]
TID = "never-forward-" + uuid.uuid4().hex
"""Marks requests that must not reach the upstream (other tests' traffic may, meanwhile)."""


def _reached(upstream: RawUpstream) -> bool:
    return any(s.header(b"x-test-id") == [TID.encode()] for s in upstream.seen)


async def _forwarded(edge, upstream: RawUpstream, client_ctx, method, target, **kw):
    return await forwarded(edge.port, HOST, client_ctx, upstream, method, target, **kw)


async def test_body_query_and_headers_arrive_byte_exact(edge, upstream, client_ctx):
    """A gzip body stays gzip, the raw query is untouched, end-to-end headers keep case/order."""
    body = gzip.compress(b'{"event":"view","n":' + b"1" * 5000 + b"}")
    target = "/track/v1?a=%20b&b=%2F%2e&c=1;2&d=&d=x&e=%E3%81%82"
    resp, seen = await _forwarded(
        edge,
        upstream,
        client_ctx,
        "POST",
        target,
        body=body,
        headers=[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
            ("X-Custom-CASE", "One"),
            ("x-dup", "1"),
            ("X-Dup", "2"),
            ("User-Agent", "test/1"),
        ],
    )
    assert resp.status == 200
    assert seen.method == b"POST"
    assert seen.target == target.encode()
    assert seen.body == body
    names = [n for n, _ in seen.headers]
    assert names[:6] == [
        b"Host",
        b"Content-Type",
        b"Content-Encoding",
        b"X-Custom-CASE",
        b"x-dup",
        b"X-Dup",
    ]
    assert seen.header(b"x-dup") == [b"1", b"2"]
    assert seen.header(b"content-encoding") == [b"gzip"]
    assert seen.header(b"content-length") == [str(len(body)).encode()]


async def test_hop_by_hop_request_headers_are_dropped(edge, upstream, client_ctx):
    """Connection, the headers it names, Keep-Alive, TE, Proxy-* never reach the upstream."""
    _, seen = await _forwarded(
        edge,
        upstream,
        client_ctx,
        "GET",
        "/track",
        headers=[
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("Trailer", "X-T"),
            ("X-Kept", "yes"),
        ],
    )
    names = {n.lower() for n, _ in seen.headers}
    assert names.isdisjoint(
        {
            b"connection",
            b"x-secret-hop",
            b"keep-alive",
            b"te",
            b"proxy-authorization",
            b"proxy-connection",
            b"trailer",
        }
    )
    assert seen.header(b"x-kept") == [b"yes"]


async def test_hop_by_hop_response_headers_are_dropped(edge, client_ctx):
    """The upstream's hop-by-hop headers, and those its Connection names, stop at the edge."""
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/hop")
    names = {n.lower() for n, _ in resp.headers}
    assert resp.status == 200 and resp.body == b"ok"
    assert names.isdisjoint(
        {b"x-hop-secret", b"keep-alive", b"proxy-connection", b"trailer", b"connection"}
    )
    assert resp.header(b"x-end-to-end") == [b"kept"]


async def test_set_cookie_headers_stay_separate(edge, client_ctx):
    """Two Set-Cookie headers arrive as two headers (one contains a comma), then the edge's."""
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/cookies")
    cookies = resp.header(b"set-cookie")
    assert cookies[:2] == [b"a=1; Path=/; HttpOnly", b"b=2, with comma; Path=/"]
    assert len(cookies) == 3 and cookies[2].startswith(b"_ep_vid=")


async def test_forwarding_headers_from_untrusted_client(edge, upstream, client_ctx):
    """A spoofed X-Forwarded-For/Forwarded is discarded; upstream sees the real peer."""
    _, seen = await _forwarded(
        edge,
        upstream,
        client_ctx,
        "POST",
        "/collection",
        body=b"x",
        headers=[
            ("X-Forwarded-For", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("X-Forwarded-Proto", "http"),
        ],
    )
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"https"]
    assert seen.header(b"x-forwarded-host") == [HOST.encode()]
    assert seen.header(b"forwarded") == [f"for=127.0.0.1;proto=https;host={HOST}".encode()]
    assert seen.header(b"x-real-ip") == []


@pytest.mark.parametrize(
    "path",
    ["/", "/trackx", "/admin", "/metrics", "/track.json", "/Track", "/generalx/y", "/favicon.ico"],
)
async def test_other_paths_are_404_and_never_forwarded(edge, upstream, client_ctx, path):
    """Only the four routes (and paths under them) leave the edge."""
    resp = await request(edge.port, HOST, client_ctx, "GET", path, headers=[("X-Test-Id", TID)])
    assert resp.status == 404
    assert b'"error":"not_found"' in resp.body
    await asyncio.sleep(0.05)
    assert not _reached(upstream)


@pytest.mark.parametrize(
    "path",
    [
        "/general/../admin",
        "/track/./x",
        "/track/%2e%2e/admin",
        "/track/%2E./x",
        "/track/..%2Fadmin",
        "/track/a\\..\\b",
    ],
)
async def test_dot_segments_are_refused(edge, upstream, client_ctx, path):
    """Dot segments, even percent-encoded, are refused before routing."""
    resp = await request(edge.port, HOST, client_ctx, "GET", path, headers=[("X-Test-Id", TID)])
    assert resp.status == 400
    await asyncio.sleep(0.05)
    assert not _reached(upstream)


async def test_host_other_than_sni_gets_421(edge, upstream, client_ctx):
    """A connection for t.alpha.test can't be used to reach t.beta.test."""
    resp = await request(
        edge.port, HOST, client_ctx, "GET", "/track", host=DOMAINS[1], headers=[("X-Test-Id", TID)]
    )
    assert resp.status == 421
    assert not _reached(upstream)


async def test_host_with_port_and_case_matches_sni(edge, client_ctx):
    """The port and letter case of Host don't matter."""
    resp = await request(
        edge.port, HOST, client_ctx, "GET", "/track", host=f"{HOST.upper()}:{edge.port}"
    )
    assert resp.status == 200


async def test_missing_host_is_400(edge, client_ctx):
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(b"GET /track HTTP/1.1\r\n\r\n")
    [resp] = await conn.read_responses()
    await conn.close()
    assert resp.status == 400


async def test_body_over_limit_is_413(edge, upstream, client_ctx):
    """Content-Length over max_body_bytes (64 KiB here) is refused before forwarding."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("POST", "/track", HOST, [("Content-Length", "70000"), ("X-Test-Id", TID)]))
    [resp] = await conn.read_responses()
    await conn.close()
    assert resp.status == 413
    assert not _reached(upstream)


async def test_chunked_body_over_limit_is_413(edge, client_ctx):
    """A chunked body is counted as it streams and cut at the limit."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("POST", "/track", HOST, [("Transfer-Encoding", "chunked")]))
    chunk = b"x" * 16384
    for _ in range(5):
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    [resp] = await conn.read_responses()
    await conn.close()
    assert resp.status == 413


async def test_chunked_request_body_arrives_whole(edge, upstream, client_ctx):
    """A chunked request body is forwarded chunked and arrives byte-identical."""
    n = len(upstream.seen)
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("POST", "/track", HOST, [("Transfer-Encoding", "chunked")]))
    conn.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [resp] = await conn.read_responses()
    await conn.close()
    seen = (await asyncio.to_thread(upstream.wait_seen, n + 1))[n]
    assert resp.status == 200
    assert (seen.body, seen.chunked) == (b"hello world", True)


async def test_chunked_and_close_delimited_responses_are_relayed(edge, client_ctx):
    r1 = await request(edge.port, HOST, client_ctx, "GET", "/track/chunked")
    r2 = await request(edge.port, HOST, client_ctx, "GET", "/track/close")
    assert (r1.status, r1.body) == (200, b"hello world")
    assert (r2.status, r2.body) == (200, b"until-eof")


async def _raw_exchange(edge, client_ctx, raw: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the edge sends until it closes."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(raw)
    try:
        return await conn.read_eof(timeout=5)
    finally:
        await conn.close()


async def test_one_upstream_head_framed_for_each_request_shape(edge, client_ctx):
    """The same upstream head (a chunked body) is re-framed per request, whatever the edge
    made for the one before: response heads are cached by head and request shape."""
    chunked = build("GET", "/track/chunked", HOST)
    http10 = chunked.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    head = build("HEAD", "/track/chunked", HOST)
    closing = build("GET", "/track/chunked", HOST, [("Connection", "close")])
    body = b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"  # the chunks, relayed as read
    for _ in range(2):  # the second round is served from the cache
        raw = await _raw_exchange(edge, client_ctx, chunked + head + closing)
        first, rest = raw.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in first
        assert b"Connection: close" not in first and rest.startswith(body)
        second, rest = rest[len(body) :].split(b"\r\n\r\n", 1)
        assert second.startswith(b"HTTP/1.1 200") and b"Connection: close" not in second
        assert b"Transfer-Encoding" not in second  # HEAD: no body, no re-framing
        third, rest = rest.split(b"\r\n\r\n", 1)
        assert b"Transfer-Encoding: chunked" in third and third.endswith(b"Connection: close")
        assert rest == body
        raw = await _raw_exchange(edge, client_ctx, http10)
        head10, body10 = raw.split(b"\r\n\r\n", 1)
        assert b"Transfer-Encoding" not in head10 and b"Connection: close" in head10
        assert body10 == b"hello world"  # close-delimited for HTTP/1.0


async def test_an_oversized_upstream_head_is_a_502_and_a_big_body_is_not(edge, client_ctx):
    """The upstream's response head is bounded (llhttp sets no limit): 502, not a worker
    holding it. A body of any size, even in the same read as its head, is not a head."""
    for target in ("/track/bighead", "/track/bighead?whole=1"):  # over many reads, or one
        resp = await request(edge.port, HOST, client_ctx, "GET", target)
        assert resp.status == 502 and b"too large" in resp.body, target
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/bigbody")
    assert resp.status == 200 and resp.body == b"b" * 1048576
    assert "response head over 65536 bytes" in edge.stderr()


async def test_upstream_status_and_reason_pass_through(edge, client_ctx):
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/status?code=418")
    assert (resp.status, resp.reason) == (418, b"Custom Reason")


async def test_keepalive_and_pipelining(edge, upstream, client_ctx):
    """Two requests written at once on one connection get two responses, in order."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("GET", "/track/slow?ms=200", HOST) + build("GET", "/track/a", HOST))
    responses = await conn.read_responses(2)
    conn.send(build("GET", "/general/b", HOST))
    responses = await conn.read_responses(3)
    await conn.close()
    assert [r.status for r in responses] == [200, 200, 200]
    seqs = [int(r.header(b"x-upstream-seq")[0]) for r in responses[1:]]
    assert seqs[0] < seqs[1]


async def test_head_request(edge, client_ctx):
    """HEAD gets the upstream's headers and no body, and the connection stays usable."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("HEAD", "/track", HOST))
    raw = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in raw:
            raw += await conn.reader.read(4096)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"X-Head: yes" in raw and raw.endswith(b"\r\n\r\n")
    conn.send(build("GET", "/track", HOST))
    async with asyncio.timeout(5):
        more = await conn.reader.read(4096)
    await conn.close()
    assert more.startswith(b"HTTP/1.1 200")


async def test_expect_100_continue(edge, upstream, client_ctx):
    """The edge says 100 Continue itself and forwards the body."""
    n = len(upstream.seen)
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("POST", "/track", HOST, [("Content-Length", "5"), ("Expect", "100-continue")]))
    async with asyncio.timeout(5):
        interim = await conn.reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"hello")
    [resp] = await conn.read_responses()
    await conn.close()
    seen = (await asyncio.to_thread(upstream.wait_seen, n + 1))[n]
    assert resp.status == 200 and seen.body == b"hello" and seen.header(b"expect") == []


async def test_huge_headers_get_431(edge, client_ctx):
    resp = await request(
        edge.port, HOST, client_ctx, "GET", "/track", headers=[("X-Big", "x" * 20000)]
    )
    assert resp.status == 431


async def test_garbage_request_gets_400(edge, client_ctx):
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(b"NOT HTTP AT ALL\x00\r\n\r\n")
    [resp] = await conn.read_responses()
    await conn.close()
    assert resp.status == 400


async def test_slow_headers_get_408(edge, client_ctx):
    """A client trickling its headers is cut after header_timeout (2 s here)."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(b"GET /track HTTP/1.1\r\nHost: ")
    start = time.monotonic()
    [resp] = await conn.read_responses(timeout=6)
    await conn.close()
    assert resp.status == 408
    assert 1.5 < time.monotonic() - start < 4


async def test_trickled_headers_dont_extend_header_timeout(edge, client_ctx):
    """More bytes of the same head don't restart its timer: cut at header_timeout (2 s)
    from the head's first read, not from its last."""
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(b"GET /track HTTP/1.1\r\n")
    start = time.monotonic()

    async def trickle() -> None:
        for i in range(20):
            await asyncio.sleep(0.25)
            conn.send(b"X-Trickle-%d: x\r\n" % i)

    feeder = asyncio.create_task(trickle())
    try:
        [resp] = await conn.read_responses(timeout=6)
    finally:
        feeder.cancel()
        await conn.close()
    assert resp.status == 408
    assert 1.5 < time.monotonic() - start < 3.5


async def test_dead_upstream_gives_502_fast(edge, client_ctx):
    start = time.monotonic()
    resp = await request(edge.port, HOST, client_ctx, "POST", "/general/dead", body=b"x")
    assert resp.status == 502
    assert time.monotonic() - start < 1.0


async def test_slow_upstream_gives_504_at_response_timeout(edge, client_ctx):
    """response_timeout is 1.5 s here; the upstream would take 5 s."""
    start = time.monotonic()
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/slow?ms=5000")
    elapsed = time.monotonic() - start
    assert resp.status == 504
    assert 1.4 < elapsed < 3


async def test_refused_connection_is_retried_on_the_next_url(edge, upstream, client_ctx):
    """Round robin over [dead, alive]: every request still succeeds via the one retry."""
    statuses = [
        (await request(edge.port, HOST, client_ctx, "POST", "/collection/retry", body=b"b")).status
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 200]


async def test_upstream_connections_are_reused(edge, upstream, client_ctx):
    """Sequential beacons ride pooled keep-alive connections to the upstream."""
    await request(edge.port, HOST, client_ctx, "GET", "/track")
    before = upstream.connections
    for _ in range(10):
        assert (await request(edge.port, HOST, client_ctx, "GET", "/track")).status == 200
    assert upstream.connections - before <= 1


async def test_request_metrics_by_route_and_status_class(edge, client_ctx):
    """The latency histogram counts by route and status class, never by domain."""
    await asyncio.sleep(0.5)  # earlier tests' observations are flushed (every 0.2 s)
    before = edge.sample(
        "edgeproxy_request_duration_seconds_count", route="/track", status_class="2xx"
    )
    await request(edge.port, HOST, client_ctx, "GET", "/track")
    after = edge.wait_sample(
        "edgeproxy_request_duration_seconds_count", before + 1, route="/track", status_class="2xx"
    )
    assert after == before + 1
    per_request = [
        line
        for line in edge.metrics().splitlines()
        if not line.startswith(("#", "edgeproxy_cert_not_after"))
    ]
    assert not [line for line in per_request if HOST in line]
    assert (
        edge.sample("edgeproxy_request_duration_seconds_count", route="none", status_class="4xx")
        >= 1
    )


async def test_timeouts_longer_than_the_timer_step_still_hold(
    tmp_path, certs_dir, upstream, chat_upstream, trust_bundle, client_ctx
):
    """A connection's timer is lazy: set at most the shortest timeout (response_timeout,
    1.5 s here) ahead, then moved on to the real deadline. An idle keep-alive connection
    (3.5 s) must survive that first wake-up, serve a request after it, and still be closed
    at its own deadline; a head started later gets header_timeout from its own start."""
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["server"]["keepalive_timeout"] = 3.5
    e = Edge(tmp_path, config)
    e.start()
    try:
        conn = await Conn.open(e.port, HOST, client_ctx)
        conn.send(build("GET", "/track/a", HOST))
        await conn.read_responses(1)
        await asyncio.sleep(2.0)  # past the first wake-up, before the keep-alive deadline
        conn.send(build("GET", "/track/b", HOST))
        responses = await conn.read_responses(2)
        assert [r.status for r in responses] == [200, 200]
        idle_from = time.monotonic()
        assert await conn.read_eof(timeout=8) == b""
        assert 3.0 < time.monotonic() - idle_from < 5.0
        await conn.close()

        conn = await Conn.open(e.port, HOST, client_ctx)
        conn.send(build("GET", "/track/a", HOST))
        await conn.read_responses(1)
        await asyncio.sleep(1.0)
        conn.send(b"GET /track HTTP/1.1\r\nHost: ")  # and no more: 408 at header_timeout (2 s)
        started = time.monotonic()
        responses = await conn.read_responses(2, timeout=8)
        await conn.close()
        assert [r.status for r in responses] == [200, 408]
        assert 1.7 < time.monotonic() - started < 3.2
    finally:
        assert e.stop() == 0


async def test_a_retried_request_sends_its_whole_body_however_it_arrived(
    edge, upstream, client_ctx
):
    """A pooled connection the upstream closed unanswered is retried on a fresh one with the
    body kept for replay; a body that came in many small reads is replayed whole (the replay
    buffer once kept only its first 64 pieces, under the original Content-Length)."""
    warm = await request(edge.port, HOST, client_ctx, "GET", "/general/warm")
    assert warm.status == 200  # leaves a pooled connection for the next request
    body = bytes(range(65)) * 100
    conn = await Conn.open(edge.port, HOST, client_ctx)
    target = f"/general/dropfirst?id={uuid.uuid4().hex}"
    conn.send(
        f"POST {target} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    await conn.writer.drain()
    n = len(upstream.seen)
    for i in range(0, len(body), 65):  # 100 TLS records: 100 reads at the edge
        conn.send(body[i : i + 65])
        await conn.writer.drain()
        await asyncio.sleep(0.002)
    [resp] = await conn.read_responses(timeout=6)
    await conn.close()
    assert resp.status == 200
    seen = [s for s in upstream.seen[n:] if s.target == target.encode()]
    assert len(seen) == 2  # dropped once, then retried
    assert seen[-1].body == body
