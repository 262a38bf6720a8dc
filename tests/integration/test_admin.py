"""The admin API, the domains CLI and the doctor, against a real running edge."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jsonschema
import pytest
import trustme
import yarl
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edgeproxy.admin.openapi import OPENAPI
from tests.conftest import RSA
from tests.integration.conftest import base_config
from tests.support.client import Conn
from tests.support.dnsserver import DnsServer
from tests.support.edge import Edge, free_port

CNAME_TARGET = "cname.edge.test"
ZONE = {
    ("t.good.test", "CNAME"): [f"{CNAME_TARGET}."],
    ("t.wrong.test", "CNAME"): ["cname.other-vendor.test."],
    ("t.arec.test", "A"): ["192.0.2.10"],
    (CNAME_TARGET, "A"): ["127.0.0.1"],
}


@pytest.fixture(scope="module")
def dns_server(loop_thread) -> Iterator[DnsServer]:
    with DnsServer(loop_thread, ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def admin_edge(
    tmp_path_factory, upstream, chat_upstream, trust_bundle, dns_server
) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("admin-edge")
    config = base_config(work / "certs", upstream, chat_upstream, trust_bundle)
    config["admin"] = {
        "listen": f"127.0.0.1:{free_port()}",
        "token_file": str(work / "admin.token"),
    }
    config["dns"] = {"cname_target": CNAME_TARGET, "resolver": f"127.0.0.1:{dns_server.port}"}
    edge = Edge(work, config).start()
    edge.admin_url = f"http://{config['admin']['listen']}"  # type: ignore[attr-defined]
    edge.token = (work / "admin.token").read_text().strip()  # type: ignore[attr-defined]
    edge.certs = work / "certs"  # type: ignore[attr-defined]
    yield edge
    assert edge.stop() == 0
    assert "PRIVATE KEY" not in edge.stderr() and "Traceback" not in edge.stderr()


class Api:
    def __init__(self, edge: Edge, token: str | None = None) -> None:
        self.edge = edge
        self.token = edge.token if token is None else token  # type: ignore[attr-defined]
        self.bodies: list[bytes] = []

    async def call(self, method: str, path: str, **kw) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        # encoded=True: the path goes out exactly as written (%2E%2E stays %2E%2E)
        url = yarl.URL(self.edge.admin_url + path, encoded=True)  # type: ignore[attr-defined]
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, url, headers=headers, **kw) as r,
        ):
            raw = await r.read()
            self.bodies.append(raw)
            assert b"PRIVATE KEY" not in raw
            try:
                return r.status, json.loads(raw) if raw else None
            except ValueError:
                return r.status, raw


def _schema_ok(name: str, doc: object) -> None:
    """A real response must match the OpenAPI document's schema for it."""
    jsonschema.validate(
        doc, {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}
    )


def _bundle(intermediate, domain: str, **kw) -> dict[str, str]:
    leaf = intermediate.issue_cert(domain, key_type=kw.pop("key_type", RSA), **kw)
    return {
        "fullchain": b"".join(b.bytes() for b in leaf.cert_chain_pems).decode(),
        "privkey": leaf.private_key_pem.bytes().decode(),
    }


def _sha(bundle: dict[str, str]) -> str:
    cert = x509.load_pem_x509_certificate(bundle["fullchain"].encode())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def _wait_active(api: Api, domain: str, timeout: float = 1.0) -> dict:
    start = time.monotonic()
    while True:
        doc = (await api.call("GET", f"/v1/domains/{domain}"))[1]
        if doc["status"] == "active":  # type: ignore[index]
            return doc  # type: ignore[return-value]
        assert time.monotonic() - start < timeout, doc
        await asyncio.sleep(0.02)


async def _served(edge: Edge, domain: str, client_ctx) -> str | None:
    try:
        conn = await Conn.open(edge.port, domain, client_ctx)
    except OSError:
        return None
    sha = hashlib.sha256(conn.peer_cert()).hexdigest()
    await conn.close()
    return sha


async def test_auth(admin_edge):
    assert (await Api(admin_edge, token="").call("GET", "/v1/domains"))[0] == 401
    assert (await Api(admin_edge, token="wrong").call("GET", "/v1/domains"))[0] == 401
    status, doc = await Api(admin_edge).call("GET", "/v1/domains")
    assert status == 200
    _schema_ok("DomainList", doc)


@pytest.mark.parametrize(
    "name",
    [
        "T.Upper.test",
        "*.wild.test",
        "192.168.1.1",
        "localhost",
        "../../etc",
        "t.a/b.test",
        "x" * 250 + ".test",
        "t..x.test",
        "t.xn--zz-.test",
        "-t.bad.test",
        "",
    ],
)
async def test_bad_names_are_refused(admin_edge, name):
    status, doc = await Api(admin_edge).call("POST", "/v1/domains", json={"domain": name})
    assert status == 422, doc
    _schema_ok("Error", doc)
    assert not (admin_edge.certs / name).exists() or name == ""  # type: ignore[attr-defined]


async def test_not_json_is_400(admin_edge):
    status, _ = await Api(admin_edge).call("POST", "/v1/domains", data=b"domain=x")
    assert status == 400


async def test_lifecycle(admin_edge, intermediate, client_ctx):
    """register -> awaiting -> upload -> active (served) in under a second -> delete."""
    api, d = Api(admin_edge), "t.life.test"
    status, doc = await api.call("POST", "/v1/domains", json={"domain": d})
    assert status == 201 and doc["status"] == "awaiting_certificate"
    _schema_ok("Domain", doc)
    assert (await api.call("POST", "/v1/domains", json={"domain": d}))[0] == 409
    folder = admin_edge.certs / d  # type: ignore[attr-defined]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"

    bundle = _bundle(intermediate, d)
    start = time.monotonic()
    status, doc = await api.call("PUT", f"/v1/domains/{d}/certificate", json=bundle)
    assert status == 202, doc
    _schema_ok("Domain", doc)
    while doc["status"] != "active":
        assert time.monotonic() - start < 1.0, doc
        await asyncio.sleep(0.02)
        doc = (await api.call("GET", f"/v1/domains/{d}"))[1]
    assert doc["certificate_sha256"] == _sha(bundle)
    assert await _served(admin_edge, d, client_ctx) == _sha(bundle)
    assert oct((folder / "privkey.pem").stat().st_mode & 0o777) == "0o600"
    assert (folder / "fullchain.pem").read_text() == bundle["fullchain"]

    status, _ = await api.call("DELETE", f"/v1/domains/{d}")
    assert status == 204
    start = time.monotonic()
    while await _served(admin_edge, d, client_ctx) is not None:
        assert time.monotonic() - start < 1.0
        await asyncio.sleep(0.02)
    assert (await api.call("GET", f"/v1/domains/{d}"))[0] == 404
    assert not folder.exists()
    audit = [
        json.loads(line)
        for line in admin_edge.stderr().splitlines()
        if '"audit":true' in line and d in line
    ]
    assert [a["action"] for a in audit] == ["register", "upload", "remove"]


async def test_rejected_upload_lists_every_problem_and_changes_nothing(
    admin_edge, intermediate, client_ctx
):
    api, d = Api(admin_edge), "t.reject.test"
    await api.call("POST", "/v1/domains", json={"domain": d})
    good = _bundle(intermediate, d)
    assert (await api.call("PUT", f"/v1/domains/{d}/certificate", json=good))[0] == 202
    await _wait_active(api, d)
    folder = admin_edge.certs / d  # type: ignore[attr-defined]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bad = _bundle(intermediate, "*.reject.test", key_type=trustme.KeyType.ECDSA)
    status, doc = await api.call("PUT", f"/v1/domains/{d}/certificate", json=bad)
    assert status == 422
    _schema_ok("Rejected", doc)
    text = " ".join(doc["errors"])
    assert "wildcard" in text and "EC key" in text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert await _served(admin_edge, d, client_ctx) == _sha(good)


async def test_key_reuse_across_domains_is_refused_on_upload(admin_edge, intermediate):
    api = Api(admin_edge)
    first = _bundle(intermediate, "t.key1.test")
    for d in ("t.key1.test", "t.key2.test"):
        await api.call("POST", "/v1/domains", json={"domain": d})
    assert (await api.call("PUT", "/v1/domains/t.key1.test/certificate", json=first))[0] == 202
    from cryptography.hazmat.primitives import serialization

    from edgeproxy.demo import Issuer, issue_leaf, pem

    key = serialization.load_pem_private_key(first["privkey"].encode(), None)
    cert, _ = issue_leaf(
        Issuer(intermediate._certificate, intermediate._private_key), "t.key2.test", key=key
    )  # type: ignore[arg-type]
    reuse = {
        "fullchain": (pem(cert) + intermediate.cert_pem.bytes()).decode(),
        "privkey": first["privkey"],
    }
    status, doc = await api.call("PUT", "/v1/domains/t.key2.test/certificate", json=reuse)
    assert status == 422 and "already registered for t.key1.test" in doc["errors"][0]


async def test_multipart_upload_and_oversized_body(admin_edge, intermediate):
    api, d = Api(admin_edge), "t.multi.test"
    await api.call("POST", "/v1/domains", json={"domain": d})
    bundle = _bundle(intermediate, d)
    form = aiohttp.FormData()
    form.add_field("fullchain", bundle["fullchain"].encode(), filename="fullchain.pem")
    form.add_field("privkey", bundle["privkey"].encode(), filename="privkey.pem")
    status, doc = await api.call("PUT", f"/v1/domains/{d}/certificate", data=form)
    assert status == 202, doc
    huge = {"fullchain": "x" * 300_000, "privkey": "y"}
    assert (await api.call("PUT", f"/v1/domains/{d}/certificate", json=huge))[0] == 413


async def test_upload_to_an_unregistered_domain_is_404(admin_edge, intermediate):
    status, doc = await Api(admin_edge).call(
        "PUT", "/v1/domains/t.nobody.test/certificate", json=_bundle(intermediate, "t.x.test")
    )
    assert status == 404
    _schema_ok("Error", doc)


async def test_openapi_matches_the_routes(admin_edge):
    status, doc = await Api(admin_edge, token="").call("GET", "/v1/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(OPENAPI))
    # every route the app serves is documented, and every documented operation is served
    from edgeproxy.admin.api import build_admin_app
    from edgeproxy.config import settings_from_dict
    from edgeproxy.control import make_registry

    work = admin_edge.workdir
    settings = settings_from_dict(
        {"admin": {"token_file": str(work / "admin.token")}, "certs": {"dir": str(work / "certs")}}
    )
    app = build_admin_app(settings, make_registry(settings), lambda: 0.0)
    served = {
        (r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops if m != "parameters"}
    assert served == documented


def _cli(edge: Edge, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeproxy",
            *args,
            "--admin-url",
            edge.admin_url,
            "--token-file",
            str(edge.workdir / "admin.token"),
        ],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_drives_the_lifecycle(admin_edge, intermediate, tmp_path):
    d = "t.cli.test"
    r = _cli(admin_edge, "domains", "add", d)
    assert r.returncode == 0 and "awaiting_certificate" in r.stdout, r.stderr
    bundle = _bundle(intermediate, d)
    (tmp_path / "f.pem").write_text(bundle["fullchain"])
    (tmp_path / "k.pem").write_text(bundle["privkey"])
    r = _cli(
        admin_edge,
        "domains",
        "upload",
        d,
        "--fullchain",
        str(tmp_path / "f.pem"),
        "--key",
        str(tmp_path / "k.pem"),
        "--wait",
        "--json",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["status"] == "active"
    r = _cli(admin_edge, "domains", "list")
    assert r.returncode == 0
    assert any(line.split()[:2] == [d, "active"] for line in r.stdout.splitlines())
    assert "PRIVATE" not in r.stdout
    r = _cli(admin_edge, "domains", "show", d)
    assert r.returncode == 0 and "certificate_sha256" in r.stdout
    (tmp_path / "k.pem").write_text("not a key")
    r = _cli(
        admin_edge,
        "domains",
        "upload",
        d,
        "--fullchain",
        str(tmp_path / "f.pem"),
        "--key",
        str(tmp_path / "k.pem"),
    )
    assert r.returncode == 1 and "not a PEM private key" in r.stdout
    r = _cli(admin_edge, "domains", "remove", d)
    assert r.returncode == 0
    r = _cli(admin_edge, "domains", "show", d)
    assert r.returncode == 1 and "404" in r.stdout


def test_cli_without_a_token_is_a_clear_error(admin_edge, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeproxy",
            "domains",
            "list",
            "--admin-url",
            admin_edge.admin_url,
            "--token-file",
            str(tmp_path / "none"),
        ],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "cannot read the admin token" in r.stderr


async def _doctor(edge: Edge, intermediate, domain: str, **kw) -> dict:
    api = Api(edge)
    await api.call("POST", "/v1/domains", json={"domain": domain})
    if kw.get("upload", True):
        await api.call(
            "PUT", f"/v1/domains/{domain}/certificate", json=_bundle(intermediate, domain)
        )
        await asyncio.sleep(0.5)
    status, doc = await api.call("GET", f"/v1/domains/{domain}/check")
    assert status == 200
    _schema_ok("Check", doc)
    return doc


def _levels(doc: dict) -> dict[str, str]:
    return {f["check"]: f["level"] for f in doc["findings"]}


async def test_doctor_all_good_but_a_dead_route(admin_edge, intermediate):
    doc = await _doctor(admin_edge, intermediate, "t.good.test")
    levels = _levels(doc)
    assert levels["dns"] == "ok" and levels["tls"] == "ok", doc["findings"]
    assert levels["itp"] == "info"  # a CNAME to another site: Safari's 7-day cap
    routes = {
        f["message"].split()[0]: f["level"] for f in doc["findings"] if f["check"] == "routes"
    }
    assert routes == {
        "/track": "ok",
        "/chat": "ok",
        "/collection": "ok",
        "/general": "ok",
        "/collection/retry": "ok",
        "/general/dead": "error",
    }
    assert doc["ok"] is False  # the test config routes /general/dead to a closed port


async def test_doctor_wrong_cname_target(admin_edge, intermediate):
    doc = await _doctor(admin_edge, intermediate, "t.wrong.test")
    [dns_finding] = [f for f in doc["findings"] if f["check"] == "dns"]
    assert not doc["ok"] and dns_finding["level"] == "error"
    assert "not cname.edge.test" in dns_finding["message"]
    assert "CNAME cname.edge.test." in dns_finding["fix"]


async def test_doctor_a_record_and_nxdomain(admin_edge, intermediate):
    arec = _levels(await _doctor(admin_edge, intermediate, "t.arec.test"))
    assert arec["dns"] == "warning"
    nx = await _doctor(admin_edge, intermediate, "t.nx.test")
    [f] = [f for f in nx["findings"] if f["check"] == "dns"]
    assert f["level"] == "error" and "NXDOMAIN" in f["message"]


async def test_doctor_no_certificate_served(admin_edge, intermediate):
    """An expired bundle on disk is rejected, so the edge serves nothing: TLS fails."""
    d = "t.good.test"
    expired = "t.expired.test"
    folder = admin_edge.certs / expired  # type: ignore[attr-defined]
    folder.mkdir()
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    b = _bundle(
        intermediate,
        expired,
        not_before=now - dt.timedelta(days=90),
        not_after=now - dt.timedelta(days=1),
    )
    (folder / "fullchain.pem").write_text(b["fullchain"])
    (folder / "privkey.pem").write_text(b["privkey"])
    await asyncio.sleep(0.5)
    status, doc = await Api(admin_edge).call("GET", f"/v1/domains/{expired}")
    assert doc["status"] == "invalid" and "expired" in doc["errors"][0]
    doc = await _doctor(admin_edge, intermediate, expired, upload=False)
    assert _levels(doc)["tls"] == "error" and not doc["ok"]
    assert d


async def test_doctor_mismatched_certificate(admin_edge, intermediate):
    from edgeproxy.config import settings_from_dict
    from edgeproxy.doctor import check_tls

    await _doctor(admin_edge, intermediate, "t.good.test")
    settings = settings_from_dict({"server": {"listen": [f"127.0.0.1:{admin_edge.port}"]}})
    [finding] = await check_tls(settings, "t.good.test", "0" * 64)
    assert finding.level == "error" and "not the registered" in finding.message


def test_doctor_cli(admin_edge):
    r = _cli(admin_edge, "doctor", "t.wrong.test")
    assert r.returncode == 1
    assert "[FAIL] dns" in r.stdout and "fix:" in r.stdout


def test_public_admin_address_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[admin]\nlisten = "0.0.0.0:9299"\n')
    r = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "admin.listen" in r.stderr and "allow_public" in r.stderr


def test_files_are_only_ours(admin_edge):
    """Nothing but domain folders is written into the certificates folder."""
    certs: Path = admin_edge.certs  # type: ignore[attr-defined]
    assert all(p.is_dir() for p in certs.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "path",
    ["%2E%2E", "..%2F..", ".edgeproxy", "%2Eedgeproxy", "..", "t.ok.test%2F..%2F..", "served"],
)
async def test_names_in_the_path_never_escape_the_certs_folder(admin_edge, path):
    """Decoded `..`, the edge's own state folder, or any invalid name: 404, nothing touched."""
    work = admin_edge.workdir
    canary = work / "canary.txt"
    canary.write_text("still here")
    api = Api(admin_edge)
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/check"), ("PUT", "/certificate")):
        status, _ = await api.call(
            method, f"/v1/domains/{path}{suffix}", json={"fullchain": "x", "privkey": "y"}
        )
        assert status in (404, 405), (method, path, status)
    assert canary.read_text() == "still here"
    assert (work / "state" / "served").is_dir()


async def test_delete_racing_an_upload_leaves_the_domain_gone(admin_edge, intermediate, client_ctx):
    api = Api(admin_edge)
    for i in range(4):
        d = f"t.race{i}.test"
        await api.call("POST", "/v1/domains", json={"domain": d})
        bundle = _bundle(intermediate, d)
        put = asyncio.ensure_future(api.call("PUT", f"/v1/domains/{d}/certificate", json=bundle))
        await asyncio.sleep(0.005 * i)
        delete = await api.call("DELETE", f"/v1/domains/{d}")
        await put
        assert delete[0] == 204
        await asyncio.sleep(0.3)
        assert (await api.call("GET", f"/v1/domains/{d}"))[0] == 404
        assert not (admin_edge.certs / d).exists()  # type: ignore[attr-defined]
        assert await _served(admin_edge, d, client_ctx) is None


async def test_two_uploads_at_once_never_mix_key_and_chain(admin_edge, intermediate):
    api, d = Api(admin_edge), "t.twice.test"
    await api.call("POST", "/v1/domains", json={"domain": d})
    for _ in range(3):
        a, b = _bundle(intermediate, d), _bundle(intermediate, d)
        ra, rb = await asyncio.gather(
            api.call("PUT", f"/v1/domains/{d}/certificate", json=a),
            api.call("PUT", f"/v1/domains/{d}/certificate", json=b),
        )
        assert (ra[0], rb[0]) == (202, 202)
        doc = await _wait_active(api, d)
        assert doc["certificate_sha256"] in (_sha(a), _sha(b)) and doc["errors"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"fullchain": "\\ud800", "privkey": "x"}',
        b'{"fullchain": ' + b"9" * 5000 + b', "privkey": "x"}',
    ],
)
async def test_malformed_upload_bodies_are_400(admin_edge, body):
    api = Api(admin_edge)
    await api.call("POST", "/v1/domains", json={"domain": "t.malformed.test"})
    status, _ = await api.call(
        "PUT",
        "/v1/domains/t.malformed.test/certificate",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    status, _ = await api.call(
        "PUT",
        "/v1/domains/t.malformed.test/certificate",
        data=b"zz",
        headers={"Content-Type": "multipart/form-data"},
    )
    assert status == 400
    assert admin_edge.get("/healthz")[0] == 200
