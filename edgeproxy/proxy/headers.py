"""Header rewriting at the edge: hop-by-hop removal both ways and the forwarding headers.

Rules:
- Hop-by-hop headers (RFC 9110 section 7.6.1) and every header named in `Connection` are
  consumed by the edge, never forwarded, in either direction.
- X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded (RFC 7239) are built
  fresh. An incoming chain is kept only when the TCP peer is a configured trusted proxy;
  from anyone else it is discarded, so a client cannot choose the address upstream sees.
- Header names keep their original case and order; only the names compared are folded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Header = tuple[bytes, bytes]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Built by the edge itself; an incoming copy is dropped (or extended when trusted).
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)


def connection_tokens(headers: Sequence[Header]) -> frozenset[bytes]:
    """Lower-cased tokens of every Connection header (`close`, `upgrade`, header names)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def end_to_end(headers: Sequence[Header], drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """Headers minus hop-by-hop ones, those named in Connection, and `drop` (lower-case)."""
    named = connection_tokens(headers)
    return [
        (n, v)
        for n, v in headers
        if (low := n.lower()) not in HOP_BY_HOP and low not in named and low not in drop
    ]


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def _forwarded_node(address: str) -> str:
    # RFC 7239 section 6: an IPv6 node is bracketed and the value quoted.
    return f'"[{address}]"' if ":" in address else address


def forwarding_headers(
    headers: Sequence[Header], peer: str, host: bytes, trusted: Sequence[Network]
) -> list[Header]:
    """The X-Forwarded-* and Forwarded headers to send upstream for one request.

    Parameters:
        headers: the request's incoming headers (the previous chain is read from them).
        peer: the TCP peer's address.
        host: the Host the client asked for (its SNI name, since Host must match it).
        trusted: CIDRs of proxies in front of the edge whose chain is believed.
    """
    prior_xff: list[bytes] = []
    prior_fwd: list[bytes] = []
    if is_trusted(peer, trusted):
        for name, value in headers:
            low = name.lower()
            if low == b"x-forwarded-for":
                prior_xff.append(value.strip())
            elif low == b"forwarded":
                prior_fwd.append(value.strip())
    peer_b = peer.encode()
    xff = b", ".join([*prior_xff, peer_b])
    node = f"for={_forwarded_node(peer)};proto=https;host={host.decode('latin-1')}".encode()
    fwd = b", ".join([*prior_fwd, node])
    return [
        (b"X-Forwarded-For", xff),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", host),
        (b"Forwarded", fwd),
    ]
