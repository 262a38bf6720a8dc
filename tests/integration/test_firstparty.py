"""First-party beacons through a running edge: cookies, CORS, opt-out, carry-over."""

from __future__ import annotations

import asyncio
import gzip
import re

from tests.conftest import DOMAINS
from tests.support.client import request
from tests.support.upstream import RawUpstream

HOST = DOMAINS[0]  # t.alpha.test -> registrable alpha.test
SITE = "https://www.alpha.test"
UUID = "0b8f5d3e-6c1a-4f2e-9a7b-1c2d3e4f5a6b"


async def _beacon(edge, upstream: RawUpstream, client_ctx, path="/track", **kw):
    n = len(upstream.seen)
    resp = await request(
        edge.port,
        HOST,
        client_ctx,
        kw.pop("method", "POST"),
        path,
        body=kw.pop("body", b'{"e":1}'),
        **kw,
    )
    seen = await asyncio.to_thread(upstream.wait_seen, n + 1, 2.0)
    return resp, (seen[n] if len(seen) > n else None)


def _cookie(resp, name: bytes) -> bytes | None:
    for c in resp.header(b"set-cookie"):
        if c.startswith(name + b"="):
            return c
    return None


async def test_new_visitor_gets_an_httponly_first_party_id(edge, upstream, client_ctx):
    resp, seen = await _beacon(edge, upstream, client_ctx)
    c = _cookie(resp, b"_ep_vid")
    assert c is not None
    m = re.match(
        rb"_ep_vid=([0-9a-f-]{36}); Domain=alpha.test; Path=/; Max-Age=(\d+); "
        rb"Secure; HttpOnly; SameSite=Lax$",
        c,
    )
    assert m and int(m.group(2)) <= 400 * 86400
    assert seen.header(b"x-edge-visitor-id") == [m.group(1)]
    assert resp.header(b"cache-control") == [b"no-store"]


async def test_returning_visitor_keeps_the_id_and_it_slides(edge, upstream, client_ctx):
    resp, seen = await _beacon(edge, upstream, client_ctx, headers=[("Cookie", f"_ep_vid={UUID}")])
    assert seen.header(b"x-edge-visitor-id") == [UUID.encode()]
    assert _cookie(resp, b"_ep_vid").startswith(f"_ep_vid={UUID};".encode())


async def test_legacy_visitor_id_is_carried_over(edge, upstream, client_ctx):
    resp, seen = await _beacon(
        edge, upstream, client_ctx, headers=[("Cookie", "krt.vis=legacy-visitor-0042")]
    )
    assert seen.header(b"x-edge-visitor-id") == [b"legacy-visitor-0042"]
    assert _cookie(resp, b"_ep_vid").startswith(b"_ep_vid=legacy-visitor-0042;")


async def test_site_cookies_never_leave_the_domain(edge, upstream, client_ctx):
    _, seen = await _beacon(
        edge,
        upstream,
        client_ctx,
        headers=[
            ("Cookie", f"session=SECRET; _ep_vid={UUID}; tracker=t1"),
            ("Cookie", "cart=42"),
            ("X-Edge-Visitor-Id", "spoofed"),
        ],
    )
    assert seen.header(b"cookie") == [f"_ep_vid={UUID}; tracker=t1".encode()]
    assert seen.header(b"x-edge-visitor-id") == [UUID.encode()]
    assert b"SECRET" not in b"".join(v for _, v in seen.headers)


async def test_upstream_set_cookies_are_rewritten_and_kept_separate(edge, client_ctx):
    resp = await request(edge.port, HOST, client_ctx, "GET", "/track/upcookies")
    cookies = resp.header(b"set-cookie")
    assert cookies[:3] == [
        b"a=1; Domain=alpha.test; Path=/",
        b"b=2; path=/; Domain=alpha.test; Secure",
        b"c=3; Path=/",
    ]
    assert cookies[3].startswith(b"_ep_vid=")
    assert resp.header(b"access-control-allow-origin") == []  # the upstream's * is dropped
    assert resp.header(b"cache-control") == [b"no-store"]


async def test_allowed_origin_preflight_is_answered_at_the_edge(edge, upstream, client_ctx):
    n = len(upstream.seen)
    resp = await request(
        edge.port,
        HOST,
        client_ctx,
        "OPTIONS",
        "/track",
        headers=[
            ("Origin", SITE),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
    )
    assert resp.status == 204
    assert resp.header(b"access-control-allow-origin") == [SITE.encode()]
    assert resp.header(b"access-control-allow-credentials") == [b"true"]
    assert int(resp.header(b"access-control-max-age")[0]) <= 600
    assert b"Origin" in resp.header(b"vary")
    await asyncio.sleep(0.05)
    assert len(upstream.seen) == n or all(s.method != b"OPTIONS" for s in upstream.seen[n:])


async def test_hostile_origin_gets_no_grant(edge, upstream, client_ctx):
    pre = await request(
        edge.port,
        HOST,
        client_ctx,
        "OPTIONS",
        "/track",
        headers=[("Origin", "https://evil.test"), ("Access-Control-Request-Method", "POST")],
    )
    assert pre.status == 403 and pre.header(b"access-control-allow-origin") == []
    resp, _ = await _beacon(
        edge,
        upstream,
        client_ctx,
        path="/track/upcookies",
        headers=[("Origin", "https://alpha.test.evil.test")],
    )
    assert resp.header(b"access-control-allow-origin") == []
    assert resp.header(b"access-control-allow-credentials") == []


async def test_allowed_origin_gets_the_grant_on_forwarded_responses(edge, upstream, client_ctx):
    resp, _ = await _beacon(edge, upstream, client_ctx, headers=[("Origin", SITE)])
    assert resp.header(b"access-control-allow-origin") == [SITE.encode()]
    assert resp.header(b"access-control-allow-credentials") == [b"true"]


async def test_opt_out_forwards_nothing_and_expires_the_id(edge, upstream, client_ctx):
    n = len(upstream.seen)
    resp = await request(
        edge.port,
        HOST,
        client_ctx,
        "POST",
        "/track",
        body=b"{}",
        headers=[("Cookie", f"_ep_vid={UUID}; _ep_optout=1"), ("X-Test-Optout", "1")],
    )
    assert resp.status == 204
    assert b"Max-Age=0" in _cookie(resp, b"_ep_vid")
    await asyncio.sleep(0.1)
    assert not any(s.header(b"x-test-optout") for s in upstream.seen[n:])


async def test_a_64k_gzip_beacon_arrives_byte_identical(edge, upstream, client_ctx):
    raw = bytes(range(256)) * 256  # incompressible-ish after the gzip header
    body = gzip.compress(raw, compresslevel=0)[:65536]
    resp, seen = await _beacon(
        edge,
        upstream,
        client_ctx,
        body=body,
        headers=[("Content-Encoding", "gzip"), ("Content-Type", "text/plain")],
    )
    assert resp.status == 200
    assert seen.body == body and seen.header(b"content-encoding") == [b"gzip"]
