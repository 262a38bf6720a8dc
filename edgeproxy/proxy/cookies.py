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
    own = policy.visitor_name
    for name, value in cookies:
        if name == own and _UUID.match(value):
            return value, "edge"
    legacy = policy.legacy_names
    if legacy:
        for name, value in cookies:
            if name in legacy and _LEGACY.match(value):
                return value, "legacy"
    return new_visitor_id(), "new"


_random = bytearray()
_taken = 0


def _forget_random() -> None:
    global _taken
    _random.clear()  # a forked worker must never hand out its parent's ids
    _taken = 0


os.register_at_fork(after_in_child=_forget_random)


def new_visitor_id() -> bytes:
    """A UUIDv4 (RFC 9562) from a buffer of urandom bytes: one getrandom(2) per 256 ids, not
    per id, and formatted here rather than through uuid.UUID (which cost 3x as much)."""
    global _taken
    if _taken + 16 > len(_random):
        _random[:] = os.urandom(4096)
        _taken = 0
    raw = _random[_taken : _taken + 16]
    _taken += 16
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant 10xx
    x = raw.hex().encode()
    return b"%s-%s-%s-%s-%s" % (x[:8], x[8:12], x[12:16], x[16:20], x[20:])


def opted_out(cookies: list[tuple[bytes, bytes]], policy: Policy) -> bool:
    name = policy.opt_out_name
    return any(n == name for n, _ in cookies)


def forwarded_cookie(cookies: list[tuple[bytes, bytes]], policy: Policy, visitor: bytes) -> bytes:
    """The Cookie header for the upstream: the validated visitor id once, then allowlisted
    upstream names. Whatever the client sent under the visitor cookie's name is dropped."""
    own = b"%s=%s" % (policy.visitor_name, visitor)
    allowed = policy.upstream_names
    if not allowed or not cookies:
        return own
    return b"; ".join([own, *(b"%s=%s" % (n, v) for n, v in cookies if n in allowed)])


def visitor_set_cookie(policy: Policy, vid: bytes) -> bytes:
    return b"%s=%s%s" % (policy.visitor_name, vid, policy.visitor_attrs)


def expire_visitor_cookie(policy: Policy) -> bytes:
    return b"%s=%s; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax" % (
        policy.visitor_name,
        policy.cookie_domain,
    )


def rewrite_domain(set_cookie: bytes, policy: Policy) -> bytes:
    """An upstream Set-Cookie with its Domain attribute (if any) set to the registrable one."""
    return _DOMAIN_ATTR.sub(lambda m: policy.cookie_domain, set_cookie)
