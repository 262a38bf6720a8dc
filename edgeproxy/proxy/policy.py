"""Per-domain first-party policy: registrable domain, allowed origins, cookie names.

Rules:
- The registrable domain comes from the Public Suffix List (offline, `publicsuffixlist`):
  `t.example.co.jp` -> `example.co.jp`. It is the visitor cookie's Domain and the root of
  the default allowed origins. A domain's policy may name it explicitly instead.
- Allowed origins by default: `https://` origins on the registrable domain or any of its
  subdomains (any port); a policy may add exact origins. Nothing else gets a CORS grant.
- Policies are resolved once per domain and cached; the hot path does a dict lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from edgeproxy.config import DomainPolicy, PolicySettings

_PSL = PublicSuffixList()


def is_public_suffix(host: str) -> bool:
    return bool(_PSL.is_public(host))


@lru_cache(maxsize=65536)
def registrable_domain(host: str) -> str:
    """The domain a site owner registered (eTLD+1); the host itself if the PSL has none."""
    return _PSL.privatesuffix(host) or host


@dataclass(frozen=True, slots=True)
class Policy:
    domain: str
    registrable: str
    settings: DomainPolicy
    extra_origins: frozenset[bytes]
    # Derived once per domain: the hot path compares and joins bytes, never re-encodes names.
    visitor_name: bytes = field(init=False)
    legacy_names: frozenset[bytes] = field(init=False)
    upstream_names: frozenset[bytes] = field(init=False)
    """Forwarded upstream besides the visitor cookie (never the visitor cookie's name)."""
    opt_out_name: bytes = field(init=False)
    cookie_domain: bytes = field(init=False)
    """`; Domain=<registrable>`, or empty for a host-only cookie."""
    visitor_attrs: bytes = field(init=False)
    """What follows `name=value` in the visitor cookie's Set-Cookie."""

    def __post_init__(self) -> None:
        s = self.settings
        visitor = s.visitor_cookie.encode()
        # No registrable domain (the host is a public suffix): a host-only cookie.
        domain = b"; Domain=" + self.registrable.encode() if self.registrable else b""
        derived = {
            "visitor_name": visitor,
            "legacy_names": frozenset(n.encode() for n in s.legacy_cookies),
            "upstream_names": frozenset(n.encode() for n in s.upstream_cookies) - {visitor},
            "opt_out_name": s.opt_out_cookie.encode(),
            "cookie_domain": domain,
            "visitor_attrs": b"%s; Path=/; Max-Age=%d; Secure; HttpOnly; SameSite=Lax"
            % (domain, s.cookie_max_age_days * 86400),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def origin_allowed(self, origin: bytes) -> bool:
        if origin in self.extra_origins:
            return True
        if not self.registrable or not origin.startswith(b"https://"):
            return False
        # An origin is scheme://host[:port] and nothing else (RFC 6454 serialization).
        host, _, port = origin[8:].partition(b":")
        if port and not port.isdigit():
            return False
        if not host or any(c in host for c in b"/?#@[]\\ "):
            return False
        host = host.lower()
        reg = self.registrable.encode()
        return host == reg or host.endswith(b"." + reg)


class PolicyBook:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._cache: dict[str, Policy] = {}

    def for_domain(self, domain: str) -> Policy:
        policy = self._cache.get(domain)
        if policy is None:
            s = self.settings.domains.get(domain, self.settings.default)
            reg = s.registrable_domain or registrable_domain(domain)
            if not s.registrable_domain and is_public_suffix(reg):
                reg = ""  # a public suffix is nobody's site: no cookie Domain, no origins
            policy = Policy(domain, reg, s, frozenset(o.encode() for o in s.allowed_origins))
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[domain] = policy
        return policy
