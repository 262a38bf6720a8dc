"""The embedded default behind `make demo`: a local CA, a demo host, a demo backend, the edge.

The demo CA issues an intermediate, which issues the demo host's certificate, so the
bundle has the shape customers register (leaf + intermediate, nginx fullchain, RSA 2048).
Everything lives in a state folder outside git (default `.demo/`), reused across runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEMO_HOST = "t.demo.test"


@dataclass(frozen=True, slots=True)
class Issuer:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ca(cn: str = "edgeproxy demo root CA") -> Issuer:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def make_intermediate(root: Issuer, cn: str = "edgeproxy demo intermediate CA") -> Issuer:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return Issuer(cert, key)


def issue_leaf(
    issuer: Issuer, domain: str, *, days: int = 90, key: rsa.RSAPrivateKey | None = None
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = key or _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(domain))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_bundle(
    certs_dir: Path,
    domain: str,
    leaf: x509.Certificate,
    key: rsa.RSAPrivateKey,
    chain: list[x509.Certificate],
) -> Path:
    """Write `<certs_dir>/<domain>/{fullchain,privkey}.pem` (key 0600, folder 0700)."""
    folder = certs_dir / domain
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / "fullchain.pem").write_bytes(pem(leaf) + b"".join(pem(c) for c in chain))
    key_path = folder / "privkey.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    return folder


def prepare_state(state: Path) -> Path:
    """Make (or reuse) the demo CA and the demo host's bundle; returns the CA file."""
    certs = state / "certs"
    ca_file = state / "ca.pem"
    bundle = certs / DEMO_HOST / "fullchain.pem"
    if ca_file.exists() and bundle.exists():
        leaf = x509.load_pem_x509_certificate(bundle.read_bytes())
        if leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=7):
            return ca_file
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    root = make_ca()
    inter = make_intermediate(root)
    leaf, key = issue_leaf(inter, DEMO_HOST)
    write_bundle(certs, DEMO_HOST, leaf, key, [inter.cert])
    ca_file.write_bytes(pem(root.cert))
    return ca_file


def _config(state: Path, port: int, backend_port: int, metrics_port: int) -> str:
    upstream = f'["http://127.0.0.1:{backend_port}"]'
    return f"""# Written by `edgeproxy demo`; see conf/edgeproxy.toml for every key.
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
[certs]
dir = {json.dumps(str(state / "certs"))}
trust_bundle = {json.dumps(str(state / "ca.pem"))}
[routes]
"/track" = {upstream}
"/chat" = {upstream}
"/collection" = {upstream}
"/general" = {upstream}
[metrics]
listen = "127.0.0.1:{metrics_port}"
[admin]
listen = ""
"""


def curl_command(ca_file: Path, port: int) -> str:
    return (
        f"curl --cacert {shlex.quote(str(ca_file.resolve()))} "
        f"--resolve {DEMO_HOST}:{port}:127.0.0.1 -H 'Content-Type: application/json' "
        f'--data \'{{"event":"pageview","page":"/demo"}}\' '
        f"https://{DEMO_HOST}:{port}/track"
    )


def run_demo(state: Path, port: int, backend_port: int, metrics_port: int) -> int:
    from edgeproxy.config import load_settings
    from edgeproxy.workers import serve

    ca_file = prepare_state(state)
    config_file = state / "edgeproxy.toml"
    config_file.write_text(_config(state.resolve(), port, backend_port, metrics_port))
    settings = load_settings(config_file, env={})
    backend = subprocess.Popen(
        [sys.executable, "-m", "edgeproxy", "demo-backend", "--port", str(backend_port)],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        if backend.poll() is not None:
            print(f"demo backend could not start on 127.0.0.1:{backend_port}", file=sys.stderr)
            return 1
        print(
            f"""
edgeproxy demo
  edge        https://{DEMO_HOST}:{port}  (127.0.0.1, certificate from {ca_file})
  backend     http://127.0.0.1:{backend_port}  (records beacons; GET /beacons lists them)
  metrics     http://127.0.0.1:{metrics_port}/metrics
  config      {config_file}

Send a beacon through the edge:
{curl_command(ca_file, port)}

Ctrl-C stops everything.
""",
            flush=True,
        )
        return serve(settings)
    finally:
        if backend.poll() is None:
            os.killpg(backend.pid, signal.SIGTERM)
            backend.wait(timeout=5)


def run_backend(port: int) -> int:
    """A tracking backend that records every beacon it gets (demo and manual testing)."""
    from aiohttp import web

    beacons: list[dict[str, object]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        beacon = {
            "method": request.method,
            "path": request.path_qs,
            "bytes": len(body),
            "client": request.headers.get("X-Forwarded-For"),
            "host": request.headers.get("X-Forwarded-Host"),
        }
        beacons.append(beacon)
        print(f"backend got beacon #{len(beacons)}: {json.dumps(beacon)}", flush=True)
        return web.json_response({"ok": True, "beacon": len(beacons)})

    async def listing(_: web.Request) -> web.Response:
        return web.json_response(beacons[-100:])

    app = web.Application()
    app.router.add_get("/beacons", listing)
    app.router.add_route("*", "/{tail:.*}", record)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    return 0
