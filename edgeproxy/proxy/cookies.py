"""Cookies at the edge: the first-party visitor id, the upstream allowlist, Domain rewrite.

Rules:
- The visitor id is, in order: the edge's own cookie (a UUID); else a legacy id the tag
  already had (a configured cookie name, validated), so existing visitors carry over; else
  a new UUIDv4. It is re-set on every forwarded response (the expiry slides) as
  `Domain=<registrable>; Path=/; Max-Age=...; Secure; HttpOnly; SameSite=Lax`.
- Only allowlisted cookies (the edge's own and the configured upstream names) go upstream;
  a site's other cookies (logins, carts) never leave the customer's domain.
- Upstream `Set-Cookie` Domain attributes are rewritten to the registrable domain (as
  nginx `proxy_cookie_domain` does); each Set-Cookie stays its own header.
- Cookie values are never logged.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable

from edgeproxy.proxy.policy import Policy

VISITOR_HEADER = b"X-Edge-Visitor-Id"
_UUID = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_LEGACY = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")
_DOMAIN_ATTR = re.compile(rb"(;\s*)domain=[^;]*", re.IGNORECASE)


def parse(cookie_headers: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs of every Cookie header, in order (RFC 6265 section 5.4)."""
    out = []
    for header in cookie_headers:
        for part in header.split(b";"):
            name, sep, value = part.strip().partition(b"=")
            if sep and name:
                out.append((name, value))
    return out


def visitor_id(cookies: list[tuple[bytes, bytes]], policy: Policy) -> tuple[bytes, str]:
    """The visitor id and where it came from: edge, legacy or new."""
    s = policy.settings
    own = s.visitor_cookie.encode()
    for name, value in cookies:
        if name == own and _UUID.match(value):
            return value, "edge"
    legacy = {n.encode() for n in s.legacy_cookies}
    for name, value in cookies:
        if name in legacy and _LEGACY.match(value):
            return value, "legacy"
    return new_visitor_id(), "new"


_random = bytearray()


def _forget_random() -> None:
    _random.clear()  # a forked worker must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_random)


def new_visitor_id() -> bytes:
    """A UUIDv4 from a buffer of urandom bytes: one getrandom(2) per 256 ids, not per id
    (per beacon it cost ~6% of a request)."""
    if len(_random) < 16:
        _random.extend(os.urandom(4096))
    raw = bytes(_random[:16])
    del _random[:16]
    return str(uuid.UUID(bytes=raw, version=4)).encode()


def opted_out(cookies: list[tuple[bytes, bytes]], policy: Policy) -> bool:
    name = policy.settings.opt_out_cookie.encode()
    return any(n == name for n, _ in cookies)


def forwarded_cookie(cookies: list[tuple[bytes, bytes]], policy: Policy, visitor: bytes) -> bytes:
    """The Cookie header for the upstream: the validated visitor id once, then allowlisted
    upstream names. Whatever the client sent under the visitor cookie's name is dropped."""
    s = policy.settings
    own = s.visitor_cookie.encode()
    allowed = {n.encode() for n in s.upstream_cookies} - {own}
    rest = [b"%s=%s" % (n, v) for n, v in cookies if n in allowed]
    return b"; ".join([b"%s=%s" % (own, visitor), *rest])


def _domain(policy: Policy) -> bytes:
    # No registrable domain (the host is a public suffix): a host-only cookie.
    return b"; Domain=" + policy.registrable.encode() if policy.registrable else b""


def visitor_set_cookie(policy: Policy, vid: bytes) -> bytes:
    s = policy.settings
    return b"%s=%s%s; Path=/; Max-Age=%d; Secure; HttpOnly; SameSite=Lax" % (
        s.visitor_cookie.encode(),
        vid,
        _domain(policy),
        s.cookie_max_age_days * 86400,
    )


def expire_visitor_cookie(policy: Policy) -> bytes:
    return b"%s=%s; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax" % (
        policy.settings.visitor_cookie.encode(),
        _domain(policy),
    )


def rewrite_domain(set_cookie: bytes, policy: Policy) -> bytes:
    """An upstream Set-Cookie with its Domain attribute (if any) set to the registrable one."""
    return _DOMAIN_ATTR.sub(lambda m: _domain(policy), set_cookie)
