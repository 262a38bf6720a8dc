"""What first-party context changes for one forwarded request: cookies, visitor id, CORS.

Decided once per request (`decide`, from the values the forwarder's one pass over the head
read), then applied to the request head sent upstream (`request_lines`) and to the response
head sent back: the forwarder drops REPLACED names from the upstream's headers, rewrites
Set-Cookie domains, and adds `response_lines`.
See cookies.py and cors.py for the rules.
"""

from __future__ import annotations

from edgeproxy.proxy import cookies, cors
from edgeproxy.proxy.headers import Header, header_lines
from edgeproxy.proxy.policy import Policy

# Request headers the edge rebuilds: a client can't set the upstream's visitor id itself.
CONSUMED = frozenset({b"cookie", b"x-edge-visitor-id"})
# Response headers the edge owns once it sets the visitor cookie.
REPLACED = cors.CORS_RESPONSE | {b"cache-control"}


class FirstParty:
    """The decisions for one request. (A plain class, not a dataclass: compiled by mypyc,
    a dataclass keeps its generated Python __init__, one more Python call per beacon.)"""

    __slots__ = (
        "policy",
        "origin",
        "origin_allowed",
        "visitor",
        "source",
        "cookie",
        "opted_out",
        "preflight_method",
        "preflight_headers",
    )

    def __init__(
        self,
        policy: Policy,
        origin: bytes | None,
        origin_allowed: bool,
        visitor: bytes,
        source: str,
        cookie: bytes,
        opted_out: bool,
        preflight_method: bytes | None,
        preflight_headers: bytes,
    ) -> None:
        self.policy = policy
        self.origin = origin
        self.origin_allowed = origin_allowed
        self.visitor = visitor
        self.source = source
        """Where the visitor id came from: edge, legacy or new."""
        self.cookie = cookie
        self.opted_out = opted_out
        self.preflight_method = preflight_method
        self.preflight_headers = preflight_headers


def decide(
    policy: Policy, jar: list[bytes], origin: bytes | None, acrm: bytes | None, acrh: bytes
) -> FirstParty:
    """The first-party decisions from the request headers that matter to them."""
    if jar:
        pairs = cookies.parse(jar)
        visitor, source = cookies.visitor_id(pairs, policy)
        cookie = cookies.forwarded_cookie(pairs, policy, visitor)
        opted_out = cookies.opted_out(pairs, policy)
    else:  # no cookie at all (a first visit): a new id, nothing else to read
        visitor, source = cookies.new_visitor_id(), "new"
        cookie = cookies.forwarded_cookie([], policy, visitor)
        opted_out = False
    allowed = origin is not None and policy.origin_allowed(origin)
    return FirstParty(policy, origin, allowed, visitor, source, cookie, opted_out, acrm, acrh)


def request_lines(fp: FirstParty) -> bytes:
    """The visitor id header and the allowlisted Cookie header, as header lines."""
    return b"%s: %s\r\nCookie: %s\r\n" % (cookies.VISITOR_HEADER, fp.visitor, fp.cookie)


def response_lines(fp: FirstParty) -> bytes:
    """What the edge adds to a forwarded response (after dropping REPLACED names), as header
    lines: the visitor cookie, no-store, and the CORS grant for an allowed origin."""
    lines = b"Set-Cookie: %s\r\nCache-Control: no-store\r\n" % cookies.visitor_set_cookie(
        fp.policy, fp.visitor
    )
    if fp.origin_allowed and fp.origin is not None:
        lines += header_lines(cors.grant(fp.origin))
    return lines


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
