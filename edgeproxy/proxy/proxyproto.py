"""PROXY protocol v1 and v2 (HAProxy's spec), for an edge behind an L4 load balancer.

Rules:
- Off by default (`server.proxy_protocol`). When on, every connection must start with a
  PROXY header, and only from a peer in `server.trusted_proxies`; anything else is closed
  before TLS starts.
- The header is read byte-exact from the raw socket (never a byte of the TLS ClientHello
  that follows), then the socket is handed to TLS as if freshly accepted.
- `LOCAL` (v2) and `UNKNOWN` (v1) carry no address: the TCP peer stays the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107


class ProxyProtocolError(Exception):
    """The connection did not start with a valid PROXY header."""


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        data += chunk
    return data


async def read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[str, int] | None:
    """The client address the header carries (None for LOCAL/UNKNOWN).

    Raises:
        ProxyProtocolError: not a PROXY header, or a malformed one.
    """
    start = await _recv_exact(loop, sock, 8)
    if start == V2_SIGNATURE[:8]:
        rest = await _recv_exact(loop, sock, 8)
        if rest[:4] != V2_SIGNATURE[8:]:
            raise ProxyProtocolError("bad PROXY v2 signature")
        ver_cmd, fam, length = rest[4], rest[5], struct.unpack("!H", rest[6:8])[0]
        if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1 or length > 4096:
            raise ProxyProtocolError("bad PROXY v2 version, command or length")
        body = await _recv_exact(loop, sock, length)
        if ver_cmd & 0x0F == 0:  # LOCAL: health checks from the balancer itself
            return None
        if fam == 0x11:
            if length < 12:
                raise ProxyProtocolError("PROXY v2 TCP4 address block too short")
            return str(ipaddress.IPv4Address(body[:4])), struct.unpack("!H", body[8:10])[0]
        if fam == 0x21:
            if length < 36:
                raise ProxyProtocolError("PROXY v2 TCP6 address block too short")
            return str(ipaddress.IPv6Address(body[:16])), struct.unpack("!H", body[32:34])[0]
        if fam == 0x00:  # UNSPEC: the balancer knows no address
            return None
        # A PROXY command with a family we don't serve (UDP, UNIX): refuse rather than
        # mistake the balancer for the client.
        raise ProxyProtocolError(f"PROXY v2 family 0x{fam:02x} is not TCP")
    if not start.startswith(b"PROXY "):
        raise ProxyProtocolError("the connection did not start with a PROXY header")
    line = start
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 header too long")
        line += await _recv_exact(loop, sock, 1)
    parts = line[:-2].decode("ascii", "replace").split(" ")
    if parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 header")
    want = 4 if parts[1] == "TCP4" else 6
    try:
        if "%" in parts[2] or "%" in parts[3]:
            raise ValueError("scoped address")
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError as exc:
        raise ProxyProtocolError("malformed PROXY v1 address or port") from exc
    if (
        src.version != want
        or dst.version != want
        or not (0 <= sport <= 65535 and 0 <= dport <= 65535)
    ):
        raise ProxyProtocolError("PROXY v1 address family or port out of range")
    return str(src), sport
