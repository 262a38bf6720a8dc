"""PROXY protocol parsing over a real socket pair: valid headers, and every malformed one
refused rather than mistaking the balancer for the client."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from edgeproxy.proxy.proxyproto import ProxyProtocolError, read_header

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


async def _parse(data: bytes):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.sendall(data + b"\x16\x03\x01TLS")  # the ClientHello that follows must stay unread
    try:
        result = await read_header(asyncio.get_running_loop(), a)
        assert a.recv(16) == b"\x16\x03\x01TLS"
        return result
    finally:
        a.close()
        b.close()


def _v2(cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", ("203.0.113.7", 5555)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n", ("2001:db8::7", 5555)),
        (b"PROXY UNKNOWN\r\n", None),
        (
            _v2(1, 0x11, bytes([203, 0, 113, 8, 10, 0, 0, 1]) + struct.pack("!HH", 1, 443)),
            ("203.0.113.8", 1),
        ),
        (
            _v2(
                1,
                0x11,
                bytes([203, 0, 113, 8, 10, 0, 0, 1])
                + struct.pack("!HH", 1, 443)
                + b"\x04\x00\x01x",
            ),
            ("203.0.113.8", 1),
        ),  # with a TLV after the addresses
        (_v2(0, 0x00, b""), None),  # LOCAL: the balancer's own health check
    ],
)
async def test_valid_headers(data, want):
    assert await _parse(data) == want


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 5555 443\r\n",  # family and address disagree
        b"PROXY TCP6 fe80::1%eth0 fe80::2 5555 443\r\n",  # scoped
        b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 443\r\n",  # port out of range
        b"PROXY TCP4 203.0.113.7 junk 5555 443\r\n",
        b"PROXY TCP4 203.0.113.7\r\n",
        b"PROXY " + b"x" * 120,
        _v2(2, 0x11, bytes(12)),  # command neither LOCAL nor PROXY
        _v2(1, 0x11, bytes(8)),  # TCP4 address block too short
        _v2(1, 0x99, bytes(12)),  # unknown family
        SIG[:8] + b"nope" + bytes(4),
    ],
)
async def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyProtocolError):
        await _parse(data)
