"""Routing table, path safety and header rewriting, without sockets."""

from __future__ import annotations

import ipaddress

import pytest

from edgeproxy.config import ProxySettings, Route
from edgeproxy.proxy.forward import Request, _host_name, _read_head, _upstream_head
from edgeproxy.proxy.headers import direct_forwarding_lines, forwarding_headers, header_lines
from edgeproxy.proxy.routes import RouteTable, is_safe_path
from edgeproxy.proxy.upstream import (
    MAX_HEAD_BYTES,
    UpstreamConnection,
    UpstreamHeadTooLarge,
    UpstreamPool,
)


def _table() -> RouteTable:
    routes = [
        Route("/track", ("http://a:1",)),
        Route("/track/v2", ("http://b:2",)),
        Route("/chat", ("http://a:1", "http://b:2"), long_lived=True),
    ]
    pools = {u: UpstreamPool(u, ProxySettings()) for r in routes for u in r.upstreams}
    return RouteTable(routes, pools)


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        (b"/track", "/track"),
        (b"/track/", "/track"),
        (b"/track/x/y", "/track"),
        (b"/track/v2", "/track/v2"),
        (b"/track/v2/z", "/track/v2"),
        (b"/track/v2x", "/track"),
        (b"/trackx", None),
        (b"/", None),
        (b"/Track", None),
        (b"/chat", "/chat"),
    ],
)
def test_prefix_matching(path, prefix):
    target = _table().match(path)
    assert (target.prefix if target else None) == prefix


def test_round_robin_with_a_different_retry_pool():
    chat = _table().match(b"/chat")
    assert chat is not None
    picks = [chat.pick() for _ in range(4)]
    assert [p.url for p, _ in picks] == ["http://a:1", "http://b:2"] * 2
    assert all(alt is not None and alt is not first for first, alt in picks)


@pytest.mark.parametrize(
    ("path", "safe"),
    [
        (b"/track", True),
        (b"/track/a.b/c.json", True),
        (b"/track/%20x", True),
        (b"/track/..", False),
        (b"/track/../x", False),
        (b"/track/./x", False),
        (b"/track/%2e%2E/x", False),
        (b"/track/.%2e", False),
        (b"/track/a%5c..%5cb", False),
        (b"/track/%00", False),
        (b"/track/a\\b", False),
        (b"track", False),
        (b"/track/...", True),
    ],
)
def test_path_safety(path, safe):
    assert is_safe_path(path) is safe


def test_one_pass_over_a_request_head():
    """Framing, first-party inputs and the end-to-end headers, from one pass (forward.py)."""
    req = Request()
    req.headers = [
        (b"Host", b"t.example.com"),
        (b"Connection", b"close, X-A"),
        (b"X-A", b"1"),
        (b"Keep-Alive", b"5"),
        (b"Content-Length", b"12"),
        (b"X-B", b"2"),
        (b"TE", b"trailers"),
        (b"Cookie", b"a=1"),
        (b"Origin", b"https://www.example.com"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Edge-Visitor-Id", b"forged"),
        (b"Expect", b"100-continue"),
    ]
    _read_head(req, max_body=100)
    assert req.forward == [(b"X-B", b"2"), (b"Origin", b"https://www.example.com")]
    assert (req.host, req.content_length, req.chunked) == (b"t.example.com", 12, False)
    assert req.jar == [b"a=1"] and req.origin == b"https://www.example.com"
    assert req.expect_continue and req.refusal is None


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ([(b"Host", b"a"), (b"Host", b"b")], 400),
        ([(b"Content-Length", b"x")], 400),
        ([(b"Content-Length", b"101")], 413),
        ([(b"Transfer-Encoding", b"gzip, chunked")], 501),
    ],
)
def test_a_bad_head_is_refused_when_its_turn_comes(headers, refusal):
    req = Request()
    req.headers = headers
    _read_head(req, max_body=100)
    assert req.refusal is not None and req.refusal[0] == refusal


def test_forwarding_headers_untrusted_peer_discards_chain():
    out = dict(
        forwarding_headers([(b"X-Forwarded-For", b"1.1.1.1")], "203.0.113.9", b"t.example.com", [])
    )
    assert out[b"X-Forwarded-For"] == b"203.0.113.9"
    assert out[b"Forwarded"] == b"for=203.0.113.9;proto=https;host=t.example.com"


def test_forwarding_headers_trusted_peer_extends_chain():
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    out = dict(
        forwarding_headers(
            [(b"X-Forwarded-For", b"198.51.100.7"), (b"Forwarded", b"for=198.51.100.7")],
            "10.1.2.3",
            b"t.example.com",
            trusted,
        )
    )
    assert out[b"X-Forwarded-For"] == b"198.51.100.7, 10.1.2.3"
    assert out[b"Forwarded"] == b"for=198.51.100.7, for=10.1.2.3;proto=https;host=t.example.com"


def test_forwarded_quotes_ipv6():
    out = dict(forwarding_headers([], "2001:db8::1", b"t.example.com", []))
    assert out[b"Forwarded"] == b'for="[2001:db8::1]";proto=https;host=t.example.com'


def test_response_heads_are_cached_only_while_small_key_included():
    """A response head is cached with the upstream's headers as its key: a big header the
    edge drops (here hop-by-hop Keep-Alive) must not be kept 512 times."""
    req = Request()
    req.method = b"POST"
    small = [(b"Server", b"up"), (b"Cache-Control", b"max-age=60")]
    big = [(b"Server", b"up"), (b"Keep-Alive", b"timeout=5, x=" + b"x" * 8000)]
    head, chunked, close, cacheable = _upstream_head(204, b"No Content", small, req, None, False)
    assert head == b"HTTP/1.1 204 No Content\r\nServer: up\r\nCache-Control: max-age=60\r\n"
    assert (chunked, close, cacheable) == (False, False, True)
    head, _, _, cacheable = _upstream_head(204, b"No Content", big, req, None, False)
    assert head == b"HTTP/1.1 204 No Content\r\nServer: up\r\n" and cacheable is False


class _Sink:
    """Records what an UpstreamConnection reports (the Sink protocol)."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.done = False
        self.lost: BaseException | None = None

    def on_upstream_head(self, status: int, reason: bytes, headers: list) -> None:
        self.status = status

    def on_upstream_body(self, data: bytes) -> None:
        self.body += data

    def on_upstream_complete(self) -> None:
        self.done = True

    def on_upstream_lost(self, exc: BaseException | None) -> None:
        self.lost = exc

    def on_upstream_upgraded(self, rest: bytes) -> None: ...
    def pause_client(self) -> None: ...
    def resume_client(self) -> None: ...
    def flush(self) -> None: ...


class _Transport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def _feed(pieces: list[bytes]) -> tuple[_Sink, _Transport]:
    conn = UpstreamConnection(UpstreamPool("http://127.0.0.1:9", ProxySettings()))
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    sink = _Sink()
    conn.start(sink, head_only=False)
    for piece in pieces:
        if not transport.aborted:
            conn.data_received(piece)
    return sink, transport


@pytest.mark.parametrize("step", [4096, 1 << 20], ids=["many reads", "one read"])
def test_an_upstream_head_over_the_limit_is_refused_however_it_is_read(step):
    """Counted across reads while the head is incomplete, and checked exactly when a single
    read holds all of it (a socket read can be bigger than the limit)."""
    raw = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n"
    raw += b"Content-Length: 2\r\n\r\nok"
    sink, transport = _feed([raw[i : i + step] for i in range(0, len(raw), step)])
    assert isinstance(sink.lost, UpstreamHeadTooLarge) and transport.aborted
    assert sink.status == 0 and not sink.done


def test_a_body_in_the_same_read_as_its_head_is_not_counted_as_head():
    body = b"b" * (4 * MAX_HEAD_BYTES)
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    sink, transport = _feed([raw])
    assert (sink.status, sink.done, sink.body == body) == (200, True, True)
    assert sink.lost is None and not transport.aborted


@pytest.mark.parametrize("peer", ["203.0.113.9", "2001:db8::1"])
def test_direct_forwarding_lines_are_the_general_ones(peer):
    """The per-connection fast path (no trusted proxies, no anonymizing) makes exactly what
    the general one makes, an incoming chain dropped the same way."""
    incoming = [(b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6")]
    general = header_lines(forwarding_headers(incoming, peer, b"t.example.com", []))
    assert direct_forwarding_lines(peer, b"t.example.com") == general
    assert b"6.6.6.6" not in general and peer.encode() in general


@pytest.mark.parametrize(
    ("host", "name"),
    [
        (b"T.Example.COM", "t.example.com"),
        (b"t.example.com.:8443", "t.example.com"),
        (b" t.example.com:443 ", "t.example.com"),
        (b"[2001:DB8::1]:443", "2001:db8::1"),
        (b"[::1]", "::1"),
        (b"[::1", "[::1"),  # (no closing bracket: left as it is, and matches no SNI name)
    ],
)
def test_host_name_of_a_host_header(host, name):
    assert _host_name(host) == name
