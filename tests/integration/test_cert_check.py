"""`edgeproxy cert check` as an operator runs it: verdicts, exit codes, no key material."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import write_bundle


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeproxy", "cert", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_valid_bundle_prints_ok_with_fingerprints(tmp_path, intermediate, trust_bundle):
    write_bundle(tmp_path, "t.ok.test", intermediate)
    d = tmp_path / "t.ok.test"
    r = _check(
        "--domain",
        "t.ok.test",
        "--fullchain",
        str(d / "fullchain.pem"),
        "--key",
        str(d / "privkey.pem"),
        "--trust-bundle",
        str(trust_bundle),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK t.ok.test: expires ")
    assert "public key sha256" in r.stdout
    assert "PRIVATE" not in r.stdout + r.stderr


def test_invalid_bundle_lists_every_problem_and_exits_1(tmp_path, intermediate, trust_bundle):
    leaf = intermediate.issue_cert("*.bad.test")  # wildcard and an EC key
    chain = tmp_path / "fullchain.pem"
    chain.write_bytes(leaf.cert_chain_pems[0].bytes())  # and no intermediate
    key = tmp_path / "privkey.pem"
    key.write_bytes(leaf.private_key_pem.bytes())
    r = _check(
        "--domain",
        "t.bad.test",
        "--fullchain",
        str(chain),
        "--key",
        str(key),
        "--trust-bundle",
        str(trust_bundle),
        "--json",
    )
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    text = " ".join(doc["errors"])
    for needle in ("wildcard", "EC key", "intermediate certificate is missing"):
        assert needle in text
    assert "PRIVATE" not in r.stdout + r.stderr


def test_key_reuse_is_refused_against_a_certs_dir(tmp_path, intermediate, trust_bundle):
    certs = tmp_path / "certs"
    write_bundle(certs, "t.first.test", intermediate)
    from cryptography.hazmat.primitives import serialization

    from edgeproxy.demo import Issuer, issue_leaf, pem

    key_pem = (certs / "t.first.test" / "privkey.pem").read_bytes()
    cert, _ = issue_leaf(
        Issuer(intermediate._certificate, intermediate._private_key),
        "t.second.test",
        key=serialization.load_pem_private_key(key_pem, None),
    )
    (tmp_path / "c.pem").write_bytes(pem(cert) + intermediate.cert_pem.bytes())
    r = _check(
        "--domain",
        "t.second.test",
        "--fullchain",
        str(tmp_path / "c.pem"),
        "--key",
        str(certs / "t.first.test" / "privkey.pem"),
        "--trust-bundle",
        str(trust_bundle),
        "--certs-dir",
        str(certs),
    )
    assert r.returncode == 1
    assert "already registered for t.first.test" in r.stdout


def test_missing_file_is_a_clear_error(tmp_path):
    r = _check(
        "--domain",
        "t.x.test",
        "--fullchain",
        str(tmp_path / "none.pem"),
        "--key",
        str(tmp_path / "none.key"),
    )
    assert r.returncode == 2
    assert "cannot read the certificate chain" in r.stderr
    assert "Traceback" not in r.stderr
