"""CORS at the edge: preflights answered here, grants added to forwarded responses.

Rules (Fetch standard, CORS protocol):
- A preflight (OPTIONS with Access-Control-Request-Method) is answered by the edge and never
  forwarded: 204 with the exact Origin echoed, credentials allowed, the allowed methods and
  headers, Max-Age <= 600 and Vary: Origin for an allowed origin; 403 with no grant otherwise.
- A forwarded response gets the same grant for an allowed origin, and loses any CORS header
  the upstream set: `*` with credentials is never sent, and only the policy decides.
"""

from __future__ import annotations

from edgeproxy.proxy.headers import Header

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = frozenset(
    {b"content-type", b"content-encoding", b"accept", b"accept-language", b"content-language"}
)
MAX_AGE = b"600"
CORS_RESPONSE: frozenset[bytes] = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
        b"access-control-expose-headers",
    }
)


def grant(origin: bytes) -> list[Header]:
    return [
        (b"Access-Control-Allow-Origin", origin),
        (b"Access-Control-Allow-Credentials", b"true"),
        (b"Vary", b"Origin"),
    ]


def preflight(
    origin: bytes | None, allowed: bool, requested_headers: bytes
) -> tuple[int, list[Header]]:
    """Status and headers answering a preflight."""
    if origin is None or not allowed:
        return 403, [(b"Vary", b"Origin")]
    asked = [h.strip() for h in requested_headers.split(b",") if h.strip()]
    if any(h.lower() not in ALLOW_HEADERS for h in asked):
        return 403, [(b"Vary", b"Origin")]
    return 204, [
        *grant(origin),
        (b"Access-Control-Allow-Methods", ALLOW_METHODS),
        (b"Access-Control-Allow-Headers", b", ".join(sorted(ALLOW_HEADERS))),
        (b"Access-Control-Max-Age", MAX_AGE),
    ]
