"""Validate one certificate bundle against the registration rules; pure, bytes in.

Rules (the customer promise, seed "CNAME Tracking"):
- fullchain is PEM, leaf first, then intermediates in issuing order, at least one
  intermediate, verifying up to a root in the system store or `certs.trust_bundle`;
- the leaf is not self-signed, not a CA, not a wildcard, and its SANs name the domain exactly;
- the private key is RSA, exactly 2048 bits, and matches the leaf;
- the leaf is valid now; under 60 days left is a warning, not an error;
- the key is used by no other registered domain (an error where a bundle is registered,
  a warning for bundles already on disk, see `validate_bundle(enforce_unique_key=...)`);
- sizes are bounded, and anything unparsable is an error, never a traceback.

Every violation is reported, not just the first, each as a typed `CertificateError` whose
message names the domain and the file. Nothing here reads files or logs key material: the
bytes come from a source (a folder today, a distributed store later).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import DNSName
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from edgeproxy.errors import CertificateError

MAX_FULLCHAIN_BYTES = 65536
MAX_KEY_BYTES = 16384
EXPIRY_WARNING_DAYS = 60
SYSTEM_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")


def _server_auth(
    _policy: object, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ValueError("the certificate is not for TLS servers (no serverAuth usage)")


# Web PKI rules, except that a critical SAN or EKU is accepted: browsers accept them, and
# private CAs (and test CAs such as trustme) issue them. Names and usage are still checked.
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_auth)
)


class Unparsable(CertificateError):
    """A file is not the PEM it should be (or is too large, or is encrypted)."""


class ChainError(CertificateError):
    """Order, missing intermediate, or no path to a trusted root."""


class SelfSigned(CertificateError):
    """The leaf signs itself: there is no CA behind it."""


class WildcardCertificate(CertificateError):
    """Registration refuses wildcard certificates."""


class NameNotCovered(CertificateError):
    """The leaf's SANs don't name the registered domain."""


class KeyRejected(CertificateError):
    """The key is not RSA 2048."""


class KeyMismatch(CertificateError):
    """The key does not belong to the leaf certificate."""


class Expired(CertificateError):
    """The leaf's notAfter has passed."""


class NotYetValid(CertificateError):
    """The leaf's notBefore is in the future."""


class KeyReused(CertificateError):
    """Another registered domain uses the same key."""


@dataclass(frozen=True, slots=True)
class BundleBytes:
    """A bundle as a source hands it over. `origin` names it in messages, `version` says
    which revision it is (file signature, store revision)."""

    domain: str
    fullchain: bytes
    privkey: bytes
    origin: str = ""
    version: str = ""

    def __repr__(self) -> str:  # never show key bytes, even in a traceback
        return f"BundleBytes({self.domain!r}, origin={self.origin!r}, version={self.version!r})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What validation found. `ok` when there are no errors; warnings never block."""

    domain: str
    errors: tuple[CertificateError, ...] = ()
    warnings: tuple[str, ...] = ()
    not_after: dt.datetime | None = None
    cert_sha256: str | None = None
    spki_sha256: str | None = None
    sans: tuple[str, ...] = ()
    served_pem: bytes = field(default=b"", repr=False)
    """Normalised key + chain PEM, ready to serve (empty unless ok). Secret: never log it."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def days_left(self, now: dt.datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400


@functools.lru_cache(maxsize=8)
def trust_store(trust_bundle: Path | None, system: bool = True) -> tuple[x509.Certificate, ...]:
    """Roots that chains may end in: the system store plus an extra PEM bundle."""
    roots: list[x509.Certificate] = []
    if system and SYSTEM_ROOTS.exists():
        roots += _load_roots(SYSTEM_ROOTS.read_bytes())
    if trust_bundle is not None:
        roots += _load_roots(trust_bundle.read_bytes())
    return tuple(roots)


_STORES: dict[int, tuple[tuple[x509.Certificate, ...], Store]] = {}


def _store(roots: tuple[x509.Certificate, ...]) -> Store:
    # Building a Store of ~140 system roots took most of a validation's Python time, and
    # an lru_cache on the tuple still hashed all 140 certificates per call (~0.35 ms, a third
    # of a validation). Callers pass the same tuple (trust_store is cached): key on identity.
    hit = _STORES.get(id(roots))
    if hit is not None and hit[0] is roots:
        return hit[1]
    store = Store(list(roots))
    if len(_STORES) >= 8:
        _STORES.clear()
    _STORES[id(roots)] = (roots, store)
    return store


def _load_roots(data: bytes) -> list[x509.Certificate]:
    # One block at a time: a single odd root in the system store (some have a negative
    # serial number, which cryptography warns about and will refuse) must not cost the rest.
    out = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in data.split(marker)[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                out.append(x509.load_pem_x509_certificate(marker + block))
            except ValueError:
                continue
    return out


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def validate_bundle(
    bundle: BundleBytes,
    *,
    roots: tuple[x509.Certificate, ...],
    key_users: Mapping[str, Collection[str]] | None = None,
    enforce_unique_key: bool = True,
    now: dt.datetime | None = None,
) -> Verdict:
    """Check one bundle against every registration rule.

    Parameters:
        bundle: the bytes and where they came from.
        roots: trusted roots (see `trust_store`).
        key_users: the registered domains by public-key SHA-256 (a lookup, not a scan: the
            registry holds 100k domains).
        enforce_unique_key: a shared key is an error (registration) or a warning (on disk).
        now: the time to check validity against (default: the current time).

    Returns a Verdict; never raises for bad input.
    """
    v = _Validation(bundle, now or dt.datetime.now(dt.UTC))
    try:
        v.run(roots, key_users or {}, enforce_unique_key)
    except Exception as exc:  # a malformed input cryptography did not expect: still an answer
        v.error(Unparsable, f"{v.chain_file}: could not be checked ({type(exc).__name__})")
    return v.verdict()


class _Validation:
    def __init__(self, bundle: BundleBytes, now: dt.datetime) -> None:
        self.b = bundle
        self.now = now
        origin = bundle.origin.rstrip("/")
        self.chain_file = f"{origin}/fullchain.pem" if origin else "fullchain.pem"
        self.key_file = f"{origin}/privkey.pem" if origin else "privkey.pem"
        self.errors: list[CertificateError] = []
        self.warnings: list[str] = []
        self.certs: list[x509.Certificate] = []
        self.key: rsa.RSAPrivateKey | None = None
        self.sans: tuple[str, ...] = ()

    def error(self, kind: type[CertificateError], message: str, hint: str | None = None) -> None:
        self.errors.append(kind(f"{self.b.domain}: {message}", hint=hint))

    def run(
        self,
        roots: tuple[x509.Certificate, ...],
        key_users: Mapping[str, Collection[str]],
        unique: bool,
    ) -> None:
        self._parse_chain()
        self._parse_key()
        if not self.certs:
            return
        leaf = self.certs[0]
        self._check_leaf(leaf)
        chain_ok = self._check_order()
        self._check_key(leaf)
        names_ok = not any(isinstance(e, NameNotCovered | WildcardCertificate) for e in self.errors)
        dates_ok = not any(isinstance(e, Expired | NotYetValid) for e in self.errors)
        if chain_ok and names_ok and dates_ok:
            self._check_trust(roots)
        fp = spki_sha256(leaf)
        # list() first: the registry may add to this set from another thread meanwhile.
        holders = key_users.get(fp, ())
        # The registry's tuples are in registration order; other collections (the CLI's
        # sets) are sorted, so that the three named are the same from run to run.
        users = list(holders) if isinstance(holders, tuple | list) else sorted(holders)
        count = len(users) - (self.b.domain in users)
        if count:
            # One finding, naming three and counting the rest, however many share the key:
            # listing and sorting them all made k domains on one key cost k^2 (at 100k
            # domains on 200 keys, 12 s of a first start).
            named = sorted(itertools.islice((d for d in users if d != self.b.domain), 3))
            more = f" and {count - 3} more" if count > 3 else ""
            msg = (
                f"{self.key_file}: the same key is already registered for {', '.join(named)}{more}"
            )
            hint = "each domain needs its own key (the key must not be used elsewhere)"
            if unique:
                self.error(KeyReused, msg, hint)
            else:
                self.warnings.append(f"{self.b.domain}: {msg}")

    def _parse_chain(self) -> None:
        data = self.b.fullchain
        if len(data) > MAX_FULLCHAIN_BYTES:
            self.error(
                Unparsable,
                f"{self.chain_file}: {len(data)} bytes, over the "
                f"{MAX_FULLCHAIN_BYTES}-byte limit for a certificate chain",
            )
            return
        if b"PRIVATE KEY-----" in data:
            self.error(
                Unparsable,
                f"{self.chain_file}: contains a private key",
                hint="the key belongs in privkey.pem only",
            )
        if b"-----BEGIN CERTIFICATE-----" not in data:
            self.error(
                Unparsable,
                f"{self.chain_file}: no PEM certificate found",
                hint="expected nginx format: -----BEGIN CERTIFICATE----- blocks",
            )
            return
        try:
            self.certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            self.error(Unparsable, f"{self.chain_file}: a certificate block is not valid PEM/DER")

    def _parse_key(self) -> None:
        data = self.b.privkey
        if len(data) > MAX_KEY_BYTES:
            self.error(
                Unparsable,
                f"{self.key_file}: {len(data)} bytes, over the "
                f"{MAX_KEY_BYTES}-byte limit for a private key",
            )
            return
        if b"ENCRYPTED" in data:
            self.error(
                Unparsable,
                f"{self.key_file}: the key is encrypted",
                hint="register the key without a passphrase",
            )
            return
        try:
            # OpenSSL's full RSA key check (primality of p and q) costs ~40 ms a key, which
            # at 100k domains is over an hour; _check_key proves what matters here: the
            # parts fit together and match the certificate.
            key = serialization.load_pem_private_key(
                data, password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            self.error(Unparsable, f"{self.key_file}: not a PEM private key")
            return
        if not isinstance(key, rsa.RSAPrivateKey):
            kind = type(key).__name__.replace("_", "").replace("PrivateKey", "")
            self.error(
                KeyRejected,
                f"{self.key_file}: {kind or 'non-RSA'} key; the "
                "registration needs an RSA 2048-bit key",
            )
            return
        if key.key_size != 2048:
            self.error(
                KeyRejected,
                f"{self.key_file}: RSA {key.key_size}-bit key; the "
                "registration needs exactly 2048 bits",
            )
        self.key = key

    def _check_leaf(self, leaf: x509.Certificate) -> None:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.sans = tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            self.sans = ()
        cns = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if any("*" in n for n in (*self.sans, *cns)):
            self.error(
                WildcardCertificate,
                f"{self.chain_file}: the leaf is a wildcard "
                f"certificate ({', '.join(n for n in (*self.sans, *cns) if '*' in n)})",
                hint=f"register a certificate issued for {self.b.domain} itself",
            )
        elif self.b.domain not in self.sans:
            names = ", ".join(self.sans) or "none"
            self.error(
                NameNotCovered,
                f"{self.chain_file}: the leaf does not name "
                f"{self.b.domain} (its DNS names: {names})",
            )
        if _is_ca(leaf):
            self.error(
                ChainError,
                f"{self.chain_file}: the first certificate is a CA, not a server certificate",
                hint="put the server certificate first",
            )
        if leaf.issuer == leaf.subject and _signed_by(leaf, leaf):
            self.error(
                SelfSigned,
                f"{self.chain_file}: the leaf is self-signed",
                hint="register a certificate issued by a certificate authority",
            )
        if self.now < leaf.not_valid_before_utc:
            self.error(
                NotYetValid,
                f"{self.chain_file}: not valid before "
                f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            )
        if self.now > leaf.not_valid_after_utc:
            self.error(
                Expired,
                f"{self.chain_file}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                hint="register the renewed certificate",
            )
        else:
            days = (leaf.not_valid_after_utc - self.now).days
            if days < EXPIRY_WARNING_DAYS:
                self.warnings.append(
                    f"{self.b.domain}: expires in {days} days ({leaf.not_valid_after_utc:%Y-%m-%d})"
                )

    def _check_order(self) -> bool:
        certs = self.certs
        if len(certs) < 2:
            if not (certs[0].issuer == certs[0].subject):
                self.error(
                    ChainError,
                    f"{self.chain_file}: only the server certificate; the "
                    "intermediate certificate is missing",
                    hint="append the intermediate after the server certificate "
                    "(cat cert.pem intermediate.pem > fullchain.pem)",
                )
            return False
        for i in range(len(certs) - 1):
            if not _signed_by(certs[i], certs[i + 1]):
                if _signed_by(certs[i + 1], certs[i]):
                    hint = "the order is reversed: server certificate first, then intermediates"
                else:
                    hint = "each certificate must be followed by the one that issued it"
                self.error(
                    ChainError,
                    f"{self.chain_file}: certificate {i + 2} did not issue certificate {i + 1}",
                    hint=hint,
                )
                return False
        return True

    def _check_key(self, leaf: x509.Certificate) -> None:
        if self.key is None:
            return
        leaf_key = leaf.public_key()
        if not isinstance(leaf_key, rsa.RSAPublicKey) or (
            leaf_key.public_numbers() != self.key.public_key().public_numbers()
        ):
            self.error(
                KeyMismatch,
                f"{self.key_file}: the key does not match the server "
                f"certificate in {self.chain_file}",
                hint="upload the key the certificate was issued for",
            )
            return
        if not _parts_fit(self.key):
            self.error(
                KeyRejected,
                f"{self.key_file}: the key is damaged (its parts don't fit together)",
                hint="export the key again from where it was generated",
            )

    def _check_trust(self, roots: tuple[x509.Certificate, ...]) -> None:
        if not roots:
            self.error(
                ChainError,
                f"{self.chain_file}: no trusted roots to verify against",
                hint="set certs.trust_bundle or install the system CA store",
            )
            return
        verifier = (
            PolicyBuilder()
            .store(_store(roots))
            .time(self.now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY
            )
            .build_server_verifier(DNSName(self.b.domain))
        )
        try:
            verifier.verify(self.certs[0], self.certs[1:])
        except VerificationError as exc:
            self.error(
                ChainError,
                f"{self.chain_file}: the chain does not verify to a trusted root ({exc})",
                hint="include the intermediate your CA gave you; private CAs go in "
                "certs.trust_bundle",
            )

    def verdict(self) -> Verdict:
        leaf = self.certs[0] if self.certs else None
        served = b""
        if not self.errors and self.key is not None:
            served = self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ) + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certs)
        return Verdict(
            domain=self.b.domain,
            errors=tuple(self.errors),
            warnings=tuple(self.warnings),
            not_after=leaf.not_valid_after_utc if leaf else None,
            cert_sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
            if leaf
            else None,
            spki_sha256=spki_sha256(leaf) if leaf else None,
            sans=self.sans,
            served_pem=served,
        )


def _parts_fit(key: rsa.RSAPrivateKey) -> bool:
    """The private parts fit together: n = pq, and d and the CRT values are inverses of e
    (OpenSSL's pairwise and CRT checks, without the primality tests of p and q).

    Arithmetic on the numbers, ~0.02 ms; the sign-and-verify round trip it replaces cost
    ~0.5 ms, 60% of a validation. It is stricter about CRT parts: OpenSSL checks each
    signature and redoes a wrong one without CRT, so a key with one bad CRT part signed
    correctly, passed the round trip, and would have made every full handshake's signature
    ~9x as costly (2.3 vs 0.25 ms here). What it lets through is a key crafted with a
    composite factor (p prime, q = r*s, parts computed to fit), which the round trip caught:
    no key generator makes one, and it can only break its own domain's handshakes.
    """
    nums = key.private_numbers()
    p, q, n, e = nums.p, nums.q, nums.public_numbers.n, nums.public_numbers.e
    if p < 3 or q < 3 or p * q != n:
        return False
    return (
        (e * nums.d) % math.lcm(p - 1, q - 1) == 1
        and (e * nums.dmp1) % (p - 1) == 1
        and (e * nums.dmq1) % (q - 1) == 1
        and (q * nums.iqmp) % p == 1
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
