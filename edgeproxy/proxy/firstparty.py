"""What first-party context changes for one forwarded request: cookies, visitor id, CORS.

Decided once per request (`decide`, from the values the forwarder's one pass over the head
read), then applied to the request head sent upstream (`request_lines`) and to the response
head sent back: the forwarder drops REPLACED names from the upstream's headers, rewrites
Set-Cookie domains, and adds `added_response_headers`.
See cookies.py and cors.py for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeproxy.proxy import cookies, cors
from edgeproxy.proxy.headers import Header
from edgeproxy.proxy.policy import Policy

# Request headers the edge rebuilds: a client can't set the upstream's visitor id itself.
CONSUMED = frozenset({b"cookie", b"x-edge-visitor-id"})
# Response headers the edge owns once it sets the visitor cookie.
REPLACED = cors.CORS_RESPONSE | {b"cache-control"}


@dataclass(slots=True)
class FirstParty:
    policy: Policy
    origin: bytes | None
    origin_allowed: bool
    visitor: bytes
    source: str
    """Where the visitor id came from: edge, legacy or new."""
    cookie: bytes
    opted_out: bool
    preflight_method: bytes | None
    preflight_headers: bytes


def decide(
    policy: Policy, jar: list[bytes], origin: bytes | None, acrm: bytes | None, acrh: bytes
) -> FirstParty:
    """The first-party decisions from the request headers that matter to them."""
    pairs = cookies.parse(jar) if jar else []
    visitor, source = cookies.visitor_id(pairs, policy)
    return FirstParty(
        policy=policy,
        origin=origin,
        origin_allowed=origin is not None and policy.origin_allowed(origin),
        visitor=visitor,
        source=source,
        cookie=cookies.forwarded_cookie(pairs, policy, visitor),
        opted_out=bool(pairs) and cookies.opted_out(pairs, policy),
        preflight_method=acrm,
        preflight_headers=acrh,
    )


def request_lines(fp: FirstParty) -> bytes:
    """The visitor id header and the allowlisted Cookie header, as header lines."""
    return b"%s: %s\r\nCookie: %s\r\n" % (cookies.VISITOR_HEADER, fp.visitor, fp.cookie)


def added_response_headers(fp: FirstParty) -> list[Header]:
    """What the edge adds to a forwarded response (after dropping REPLACED names)."""
    out = [
        (b"Set-Cookie", cookies.visitor_set_cookie(fp.policy, fp.visitor)),
        (b"Cache-Control", b"no-store"),
    ]
    if fp.origin_allowed and fp.origin is not None:
        out += cors.grant(fp.origin)
    return out


def opt_out_headers(fp: FirstParty) -> list[Header]:
    """An opted-out visitor: 204, nothing forwarded, the id cookie expired."""
    out = [
        (b"Set-Cookie", cookies.expire_visitor_cookie(fp.policy)),
        (b"Cache-Control", b"no-store"),
    ]
    if fp.origin_allowed and fp.origin is not None:
        out += cors.grant(fp.origin)
    return out


def preflight_answer(fp: FirstParty) -> tuple[int, list[Header]]:
    return cors.preflight(fp.origin, fp.origin_allowed, fp.preflight_headers)
