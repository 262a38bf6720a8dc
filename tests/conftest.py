"""Shared fixtures: a trustme CA with an intermediate, bundles for several customer hosts
(one an IDN), real upstreams on loopback, and a client context trusting the CA."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.upstream import AiohttpUpstream, LoopThread, RawUpstream

DOMAINS = ("t.alpha.test", "t.beta.test", "t.xn--bcher-kva.test")  # the last is t.bücher.test


RSA = trustme.KeyType.RSA  # registration needs RSA 2048; trustme defaults to ECDSA


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA(key_type=RSA)


@pytest.fixture(scope="session")
def intermediate(ca: trustme.CA) -> trustme.CA:
    return ca.create_child_ca(key_type=RSA)


@pytest.fixture(scope="session")
def trust_bundle(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Path:
    """The test root as a PEM file, for certs.trust_bundle."""
    path = tmp_path_factory.mktemp("trust") / "roots.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def write_bundle(certs_dir: Path, domain: str, issuer: trustme.CA) -> trustme.LeafCert:
    """Write certs_dir/<domain>/{fullchain,privkey}.pem the way an operator does."""
    leaf = issuer.issue_cert(domain, key_type=RSA)
    folder = certs_dir / domain
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (folder / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
    (folder / "privkey.pem").chmod(0o600)
    return leaf


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory, intermediate: trustme.CA) -> Path:
    d = tmp_path_factory.mktemp("certs")
    for domain in DOMAINS:
        write_bundle(d, domain, intermediate)
    return d


@pytest.fixture(scope="session")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="session")
def upstream(loop_thread: LoopThread) -> Iterator[RawUpstream]:
    up = RawUpstream(loop_thread).start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def chat_upstream(loop_thread: LoopThread) -> Iterator[AiohttpUpstream]:
    up = AiohttpUpstream(loop_thread).start()
    yield up
    up.stop()
