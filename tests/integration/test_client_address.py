"""Client addresses: PROXY protocol v1/v2 from trusted balancers only, trusted X-Forwarded-For,
and the anonymization switch."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
from collections.abc import Iterator

import pytest

from tests.conftest import DOMAINS
from tests.integration.conftest import base_config
from tests.support.client import Conn, build, forwarded
from tests.support.edge import Edge

HOST = DOMAINS[0]


@pytest.fixture(scope="module")
def proxied_edge(
    tmp_path_factory, certs_dir, upstream, chat_upstream, trust_bundle
) -> Iterator[Edge]:
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    # 127.0.0.2 is the balancer; 127.0.0.1 (the doctor, on the edge's host) is trusted too;
    # 127.0.0.3 is anyone else.
    config["server"].update(proxy_protocol=True, trusted_proxies=["127.0.0.2/32", "127.0.0.1/32"])
    edge = Edge(tmp_path_factory.mktemp("proxied"), config).start()
    yield edge
    assert edge.stop() == 0
    assert "Traceback" not in edge.stderr()


@pytest.fixture(scope="module")
def anonymizing_edge(
    tmp_path_factory, certs_dir, upstream, chat_upstream, trust_bundle
) -> Iterator[Edge]:
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["server"]["trusted_proxies"] = ["127.0.0.1/32"]
    config["policy"]["anonymize_ip"] = True
    edge = Edge(tmp_path_factory.mktemp("anon"), config).start()
    yield edge
    assert edge.stop() == 0


def _v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


async def _via_balancer(edge: Edge, header: bytes, client_ctx, source: str = "127.0.0.2"):
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", edge.port))
        sock.sendall(header)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_ctx, server_hostname=HOST
        )
    except BaseException:
        sock.close()  # a refused connection must not leak its socket into a later test
        raise
    conn = Conn(reader, writer)
    try:
        conn.send(build("POST", "/track", HOST, body=b"{}"))
        [resp] = await conn.read_responses()
    finally:
        await conn.close()
    return resp


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", b"203.0.113.7"),
        (_v2("203.0.113.8", "10.0.0.1", 5555, 443), b"203.0.113.8"),
        (_v2("2001:db8::7", "2001:db8::1", 5555, 443), b"2001:db8::7"),
    ],
)
async def test_proxy_protocol_gives_the_client_address(
    proxied_edge, upstream, client_ctx, header, client
):
    n = len(upstream.seen)
    resp = await _via_balancer(proxied_edge, header, client_ctx)
    seen = upstream.wait_seen(n + 1)[n]
    assert resp.status == 200
    assert seen.header(b"x-forwarded-for") == [client]


async def test_proxy_protocol_from_an_untrusted_peer_is_refused(proxied_edge, client_ctx):
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        await _via_balancer(
            proxied_edge,
            b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n",
            client_ctx,
            source="127.0.0.3",
        )


async def test_missing_proxy_header_is_refused(proxied_edge, client_ctx):
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        await _via_balancer(proxied_edge, b"", client_ctx)


async def test_trusted_chain_and_anonymization(anonymizing_edge, upstream, client_ctx):
    resp, seen = await forwarded(
        anonymizing_edge.port,
        HOST,
        client_ctx,
        upstream,
        "POST",
        "/track",
        body=b"{}",
        headers=[("X-Forwarded-For", "198.51.100.77")],
    )
    assert resp.status == 200
    assert seen.header(b"x-forwarded-for") == [b"198.51.100.0, 127.0.0.0"]
    assert seen.header(b"forwarded")[0].startswith(b"for=198.51.100.0;")
    lines = await asyncio.to_thread(anonymizing_edge.wait_access, 1)
    assert lines[-1]["client"] == "198.51.100.0"


async def test_doctor_speaks_proxy_protocol_to_its_edge(proxied_edge):
    from edgeproxy.config import settings_from_dict
    from edgeproxy.doctor import check_routes, check_tls

    settings = settings_from_dict(
        {
            "server": {
                "listen": [f"127.0.0.1:{proxied_edge.port}"],
                "proxy_protocol": True,
                "trusted_proxies": ["127.0.0.1/32"],
            }
        }
    )
    [tls] = await check_tls(settings, HOST, None)
    assert tls.level == "ok", tls
    routes = await check_routes(settings, HOST)
    assert [f.level for f in routes] == ["ok"] * 4


async def test_anonymization_of_ports_and_other_client_headers(
    anonymizing_edge, upstream, client_ctx
):
    resp, seen = await forwarded(
        anonymizing_edge.port,
        HOST,
        client_ctx,
        upstream,
        "POST",
        "/track",
        body=b"{}",
        headers=[
            ("X-Forwarded-For", "198.51.100.23:41234"),
            ("True-Client-IP", "198.51.100.23"),
            ("CF-Connecting-IP", "198.51.100.23"),
        ],
    )
    assert resp.status == 200
    assert seen.header(b"x-forwarded-for") == [b"198.51.100.0, 127.0.0.0"]
    assert seen.header(b"forwarded")[0].startswith(b"for=198.51.100.0;")
    assert seen.header(b"true-client-ip") == [] and seen.header(b"cf-connecting-ip") == []
    assert b"198.51.100.23" not in b"".join(v for _, v in seen.headers)
