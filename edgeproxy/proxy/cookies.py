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


_ids: list[bytes] = []
_SET_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))  # RFC 9562: version 4
_SET_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # RFC 9562: variant 10xx


def _forget_ids() -> None:
    _ids.clear()  # a forked worker must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_ids)


def new_visitor_id() -> bytes:
    """A UUIDv4 (RFC 9562). Made 256 at a time from one getrandom(2) and formatted here, not
    through uuid.UUID: per beacon that had cost ~6% of a request, now a list pop."""
    if not _ids:
        raw = bytearray(os.urandom(4096))
        raw[6::16] = raw[6::16].translate(_SET_VERSION)
        raw[8::16] = raw[8::16].translate(_SET_VARIANT)
        h = raw.hex().encode()
        _ids.extend(
            b"%s-%s-%s-%s-%s"
            % (
                h[i : i + 8],
                h[i + 8 : i + 12],
                h[i + 12 : i + 16],
                h[i + 16 : i + 20],
                h[i + 20 : i + 32],
            )
            for i in range(0, 8192, 32)
        )
    return _ids.pop()


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
