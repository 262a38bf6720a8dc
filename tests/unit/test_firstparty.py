"""Policy, cookies and CORS rules, without sockets."""

from __future__ import annotations

import re

import pytest

from edgeproxy.config import ConfigError, DomainPolicy, PolicySettings, settings_from_dict
from edgeproxy.proxy import cookies, cors, firstparty
from edgeproxy.proxy.policy import PolicyBook, registrable_domain

UUID = b"0b8f5d3e-6c1a-4f2e-9a7b-1c2d3e4f5a6b"


def _policy(domain: str = "t.example.co.jp", **kw):
    return PolicyBook(PolicySettings(DomainPolicy(**kw))).for_domain(domain)


@pytest.mark.parametrize(
    ("host", "reg"),
    [
        ("t.example.co.jp", "example.co.jp"),
        ("t.example.com", "example.com"),
        ("a.b.t.example.com", "example.com"),
        ("t.example.test", "example.test"),
        ("t.shop.github.io", "shop.github.io"),
    ],
)
def test_registrable_domain(host, reg):
    assert registrable_domain(host) == reg


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (b"https://www.example.co.jp", True),
        (b"https://example.co.jp", True),
        (b"https://a.b.example.co.jp:8443", True),
        (b"http://www.example.co.jp", False),
        (b"https://evil.test", False),
        (b"https://example.co.jp.evil.test", False),
        (b"https://notexample.co.jp", False),
        (b"https://co.jp", False),
        (b"null", False),
        (b"https://user@www.example.co.jp", False),
    ],
)
def test_allowed_origins(origin, ok):
    assert _policy().origin_allowed(origin) is ok


def test_extra_allowed_origin():
    p = _policy(allowed_origins=("https://shop.partner.test",))
    assert p.origin_allowed(b"https://shop.partner.test")
    assert not p.origin_allowed(b"https://other.partner.test")


def test_visitor_id_order_edge_then_legacy_then_new():
    p = _policy(legacy_cookies=("krt.vis",))
    jar = cookies.parse([b"krt.vis=legacy-id-123; _ep_vid=" + UUID])
    assert cookies.visitor_id(jar, p) == (UUID, "edge")
    jar = cookies.parse([b"krt.vis=legacy-id-123", b"_ep_vid=not-a-uuid"])
    assert cookies.visitor_id(jar, p) == (b"legacy-id-123", "legacy")
    jar = cookies.parse([b"krt.vis=<script>"])  # invalid legacy id: not carried over
    vid, source = cookies.visitor_id(jar, p)
    assert source == "new" and re.match(rb"^[0-9a-f-]{36}$", vid)


def test_only_allowlisted_cookies_go_upstream():
    p = _policy(upstream_cookies=("tracker",))
    jar = cookies.parse([b"session=secret; _ep_vid=" + UUID + b"; tracker=1; cart=9"])
    assert cookies.forwarded_cookie(jar, p, UUID) == b"_ep_vid=" + UUID + b"; tracker=1"


def test_the_clients_own_visitor_cookies_never_go_upstream():
    """Only the validated id goes up, once, however many _ep_vid cookies the client sent."""
    p = _policy()
    jar = cookies.parse([b"_ep_vid=ATTACKER-CHOSEN; _ep_vid=" + UUID])
    vid, _ = cookies.visitor_id(jar, p)
    assert vid == UUID
    assert cookies.forwarded_cookie(jar, p, vid) == b"_ep_vid=" + UUID


def test_visitor_cookie_attributes():
    c = cookies.visitor_set_cookie(_policy(), UUID)
    assert c == (
        b"_ep_vid=" + UUID + b"; Domain=example.co.jp; Path=/; Max-Age=34560000; "
        b"Secure; HttpOnly; SameSite=Lax"
    )
    assert b"Max-Age=0" in cookies.expire_visitor_cookie(_policy())


def test_set_cookie_domain_rewrite():
    p = _policy()
    assert cookies.rewrite_domain(b"a=1; Domain=backend.internal; Path=/", p) == (
        b"a=1; Domain=example.co.jp; Path=/"
    )
    assert cookies.rewrite_domain(b"b=2; path=/; domain=.x.test; Secure", p) == (
        b"b=2; path=/; Domain=example.co.jp; Secure"
    )
    assert cookies.rewrite_domain(b"c=3; Path=/", p) == b"c=3; Path=/"


def test_preflight():
    status, headers = cors.preflight(
        b"https://www.example.co.jp", True, b"Content-Type, content-encoding"
    )
    h = dict(headers)
    assert status == 204
    assert h[b"Access-Control-Allow-Origin"] == b"https://www.example.co.jp"
    assert h[b"Access-Control-Allow-Credentials"] == b"true"
    assert int(h[b"Access-Control-Max-Age"]) <= 600 and h[b"Vary"] == b"Origin"
    assert cors.preflight(b"https://evil.test", False, b"")[0] == 403
    assert b"Access-Control-Allow-Origin" not in dict(cors.preflight(b"https://e", False, b"")[1])
    assert cors.preflight(b"https://www.example.co.jp", True, b"X-Secret")[0] == 403


def test_responses_get_the_edges_cors_and_caching_not_the_upstreams():
    """The forwarder drops REPLACED names from upstream responses and adds these (end to end:
    test_firstparty.py's upstream `*` and max-age are replaced)."""
    assert {b"access-control-allow-origin", b"cache-control"} <= firstparty.REPLACED
    fp = firstparty.decide(_policy(), [], b"https://evil.test", None, b"")
    out = firstparty.response_lines(fp)
    assert out.endswith(b"\r\n")
    lines = out[:-2].split(b"\r\n")
    assert lines[0].startswith(b"Set-Cookie: _ep_vid=" + fp.visitor + b";")
    assert b"Cache-Control: no-store" in lines
    assert not any(line.startswith(b"Access-Control-") for line in lines)
    fp = firstparty.decide(_policy(), [], b"https://www.example.co.jp", None, b"")
    lines = firstparty.response_lines(fp)[:-2].split(b"\r\n")
    assert b"Access-Control-Allow-Origin: https://www.example.co.jp" in lines
    assert b"Access-Control-Allow-Credentials: true" in lines


def test_policy_config():
    s = settings_from_dict(
        {
            "policy": {
                "legacy_cookies": ["krt.vis"],
                "anonymize_ip": True,
                "domains": {"t.example.com": {"allowed_origins": ["https://shop.partner.test"]}},
            }
        }
    )
    assert s.policy.anonymize_ip
    assert s.policy.domains["t.example.com"].legacy_cookies == ("krt.vis",)  # inherited
    assert s.policy.domains["t.example.com"].allowed_origins == ("https://shop.partner.test",)
    with pytest.raises(ConfigError, match="cookie_max_age_days"):
        settings_from_dict({"policy": {"cookie_max_age_days": 500}})
    with pytest.raises(ConfigError, match="not a valid cookie name"):
        settings_from_dict({"policy": {"visitor_cookie": "a b"}})
    with pytest.raises(ConfigError, match=r'policy.domains."t.x.test".nope: unknown key'):
        settings_from_dict({"policy": {"domains": {"t.x.test": {"nope": 1}}}})


def test_a_public_suffix_host_gets_no_origins_and_a_host_only_cookie():
    p = PolicyBook(PolicySettings(DomainPolicy())).for_domain("github.io")
    assert not p.origin_allowed(b"https://anyone.github.io")
    assert b"Domain=" not in cookies.visitor_set_cookie(p, UUID)


def test_new_visitor_ids_are_unique_uuid4s_and_not_inherited_across_fork():
    import os

    ids = [cookies.new_visitor_id() for _ in range(600)]  # more than one random buffer
    assert len(set(ids)) == 600
    assert all(
        re.match(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", i)
        for i in ids
    )
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's next id must not be the parent's
        os.write(w, cookies.new_visitor_id())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64)
    os.close(r)
    os.close(w)
    assert child != cookies.new_visitor_id()
