"""Registration rules, one bad bundle per rule, and the message each gives."""

from __future__ import annotations

import datetime as dt
import re

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edgeproxy.demo import Issuer, issue_leaf, key_pem, pem
from edgeproxy.tls.bundle import (
    BundleBytes,
    ChainError,
    Expired,
    KeyMismatch,
    KeyRejected,
    KeyReused,
    NameNotCovered,
    NotYetValid,
    SelfSigned,
    Unparsable,
    WildcardCertificate,
    spki_sha256,
    validate_bundle,
)
from tests.conftest import RSA

DOMAIN = "t.example.test"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def roots(ca: trustme.CA) -> tuple[x509.Certificate, ...]:
    return (x509.load_pem_x509_certificate(ca.cert_pem.bytes()),)


def _bundle(
    leaf: trustme.LeafCert,
    *,
    chain: list[bytes] | None = None,
    key: bytes | None = None,
    domain: str = DOMAIN,
) -> BundleBytes:
    pems = [b.bytes() for b in leaf.cert_chain_pems] if chain is None else chain
    return BundleBytes(
        domain, b"".join(pems), key or leaf.private_key_pem.bytes(), origin=f"certs/{domain}"
    )


def _issuer(ca: trustme.CA) -> Issuer:
    return Issuer(ca._certificate, ca._private_key)  # trustme keeps them private


def _check(bundle: BundleBytes, roots, **kw):
    return validate_bundle(bundle, roots=roots, now=NOW, **kw)


def _only(verdict, kind, match: str) -> None:
    assert [type(e) for e in verdict.errors] == [kind], verdict.errors
    assert match in str(verdict.errors[0]), str(verdict.errors[0])
    assert str(verdict.errors[0]).startswith(f"{verdict.domain}: ")


def test_a_good_bundle_passes_with_fingerprints(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    v = _check(_bundle(leaf), roots)
    assert v.ok and v.errors == () and v.warnings == ()
    assert v.sans == (DOMAIN,)
    assert len(v.cert_sha256 or "") == 64 and len(v.spki_sha256 or "") == 64
    assert v.served_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert v.served_pem.count(b"BEGIN CERTIFICATE") == 2


def test_wildcard(intermediate, roots):
    leaf = intermediate.issue_cert("*.example.test", key_type=RSA)
    _only(_check(_bundle(leaf), roots), WildcardCertificate, "wildcard certificate")


def test_ec_key(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN)  # trustme's default: ECDSA
    _only(_check(_bundle(leaf), roots), KeyRejected, "EC key; the registration needs an RSA 2048")


def test_rsa_3072(intermediate, roots):
    cert, key = issue_leaf(_issuer(intermediate), DOMAIN, key=rsa.generate_private_key(65537, 3072))
    b = BundleBytes(DOMAIN, pem(cert) + intermediate.cert_pem.bytes(), key_pem(key), "certs/x")
    _only(_check(b, roots), KeyRejected, "RSA 3072-bit key")


def test_key_mismatch(intermediate, roots):
    a = intermediate.issue_cert(DOMAIN, key_type=RSA)
    b = intermediate.issue_cert(DOMAIN, key_type=RSA)
    _only(
        _check(_bundle(a, key=b.private_key_pem.bytes()), roots),
        KeyMismatch,
        "certs/t.example.test/privkey.pem: the key does not match",
    )


def test_missing_intermediate(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    v = _check(_bundle(leaf, chain=[leaf.cert_chain_pems[0].bytes()]), roots)
    _only(v, ChainError, "the intermediate certificate is missing")
    assert "cat cert.pem intermediate.pem" in (v.errors[0].hint or "")


def test_reversed_chain(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    chain = [p.bytes() for p in reversed(leaf.cert_chain_pems)]
    v = _check(_bundle(leaf, chain=chain), roots)
    assert all(isinstance(e, ChainError | NameNotCovered | KeyMismatch) for e in v.errors)
    assert any("the first certificate is a CA" in str(e) for e in v.errors)


def test_expired(intermediate, roots):
    leaf = intermediate.issue_cert(
        DOMAIN,
        key_type=RSA,
        not_before=NOW - dt.timedelta(days=100),
        not_after=NOW - dt.timedelta(days=1),
    )
    _only(_check(_bundle(leaf), roots), Expired, "expired on")


def test_not_yet_valid(intermediate, roots):
    leaf = intermediate.issue_cert(
        DOMAIN,
        key_type=RSA,
        not_before=NOW + dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=90),
    )
    _only(_check(_bundle(leaf), roots), NotYetValid, "not valid before")


def test_expiring_soon_is_a_warning(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA, not_after=NOW + dt.timedelta(days=20))
    v = _check(_bundle(leaf), roots)
    assert v.ok
    assert len(v.warnings) == 1 and re.search(r"expires in (19|20) days", v.warnings[0])


def test_wrong_name(intermediate, roots):
    leaf = intermediate.issue_cert("t.other.test", key_type=RSA)
    _only(
        _check(_bundle(leaf), roots),
        NameNotCovered,
        "does not name t.example.test (its DNS names: t.other.test)",
    )


@pytest.mark.parametrize(
    ("chain", "key", "match"),
    [
        (b"hello", b"world", "no PEM certificate found"),
        (
            b"-----BEGIN CERTIFICATE-----\nnotbase64!\n-----END CERTIFICATE-----\n",
            b"x",
            "not valid PEM",
        ),
        (b"\x00\xff" * 10, b"\x00", "no PEM certificate found"),
        (b"x" * 70000, b"x", "over the 65536-byte limit"),
    ],
)
def test_garbage_is_an_error_not_a_traceback(roots, chain, key, match):
    v = _check(BundleBytes(DOMAIN, chain, key, "certs/t.example.test"), roots)
    assert not v.ok
    assert all(isinstance(e, Unparsable) for e in v.errors)
    assert match in str(v.errors[0])
    assert any("privkey.pem: not a PEM private key" in str(e) for e in v.errors)


def test_private_key_pasted_into_fullchain_is_refused_without_echoing_it(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    key = leaf.private_key_pem.bytes()
    v = _check(_bundle(leaf, chain=[b.bytes() for b in leaf.cert_chain_pems] + [key]), roots)
    assert any("contains a private key" in str(e) for e in v.errors)
    body = key.split(b"\n")[1].decode()
    assert all(body not in str(e) for e in v.errors)


def test_self_signed(roots):
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, DOMAIN)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    v = _check(BundleBytes(DOMAIN, pem(cert), key_pem(key), "certs/x"), roots)
    assert SelfSigned in [type(e) for e in v.errors]
    assert "self-signed" in str(v.errors[0])


def test_untrusted_root(roots):
    other = trustme.CA(key_type=RSA).create_child_ca(key_type=RSA)
    leaf = other.issue_cert(DOMAIN, key_type=RSA)
    _only(_check(_bundle(leaf), roots), ChainError, "does not verify to a trusted root")


def test_key_reused_by_another_domain(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    fp = spki_sha256(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    v = _check(_bundle(leaf), roots, key_users={fp: {"t.first.test"}})
    _only(v, KeyReused, "the same key is already registered for t.first.test")
    on_disk = _check(
        _bundle(leaf), roots, key_users={fp: {"t.first.test"}}, enforce_unique_key=False
    )
    assert on_disk.ok and "already registered for t.first.test" in on_disk.warnings[0]


def test_a_key_shared_by_many_names_three_and_counts_the_rest(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    fp = spki_sha256(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    # the registry's tuple, in registration order, with this domain's own earlier version
    users = ("t.d4.test", "t.d0.test", DOMAIN, "t.d3.test", "t.d1.test", "t.d2.test")
    v = _check(_bundle(leaf), roots, key_users={fp: users}, enforce_unique_key=False)
    assert v.ok
    assert v.warnings[0].endswith(
        "the same key is already registered for t.d0.test, t.d3.test, t.d4.test and 2 more"
    )
    # a set (cert check's): the first three in name order, the same on every run
    v = _check(_bundle(leaf), roots, key_users={fp: set(users)}, enforce_unique_key=False)
    assert v.warnings[0].endswith(
        "the same key is already registered for t.d0.test, t.d1.test, t.d2.test and 2 more"
    )


def test_every_violation_is_reported(intermediate, roots):
    """A wildcard, expired certificate with an EC key yields all three errors at once."""
    leaf = intermediate.issue_cert(
        "*.example.test",
        not_before=NOW - dt.timedelta(days=100),
        not_after=NOW - dt.timedelta(days=1),
    )
    kinds = {type(e) for e in _check(_bundle(leaf), roots).errors}
    assert {WildcardCertificate, Expired, KeyRejected} <= kinds


def test_verdict_repr_never_shows_key_material(intermediate, roots):
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    b = _bundle(leaf)
    v = _check(b, roots)
    assert b"PRIVATE" not in repr(v).encode() and "PRIVATE" not in repr(b)
    assert serialization  # imported for key formats above


@pytest.mark.parametrize(
    "damage",
    [
        {"d": 2, "dmp1": 2},  # signs wrongly
        {"dmp1": 2},  # signs right only because OpenSSL redoes each signature without CRT
        {"iqmp": 4},
    ],
)
def test_damaged_key_is_refused(intermediate, roots, damage):
    """A key whose private parts don't fit (full RSA validation, with its primality tests,
    is skipped for speed) is refused, even where OpenSSL would still sign with it: a bad
    CRT part costs every signature ~9x."""
    leaf = intermediate.issue_cert(DOMAIN, key_type=RSA)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    n = key.private_numbers()  # type: ignore[union-attr]
    parts = {k: getattr(n, k) ^ damage.get(k, 0) for k in ("p", "q", "d", "dmp1", "dmq1", "iqmp")}
    bad = rsa.RSAPrivateNumbers(**parts, public_numbers=n.public_numbers).private_key(
        unsafe_skip_rsa_key_validation=True
    )
    v = _check(_bundle(leaf, key=key_pem(bad)), roots)
    _only(v, KeyRejected, "the key is damaged")
