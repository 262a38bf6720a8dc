"""End to end in a real browser: Debian's Chromium loads https://www.example.test, whose tag
sends a sendBeacon and credentialed JSON fetches to https://t.example.test through the edge.

Asserts the upstream got the beacons with one visitor id, that the id cookie is invisible to
page scripts (HttpOnly), and that the page's own cookies never reached the upstream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import RSA, write_bundle
from tests.integration.conftest import base_config
from tests.support.edge import Edge
from tests.support.upstream import LoopThread, RawUpstream

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EDGE_HOST, SITE_HOST = "t.example.test", "www.example.test"

TAG = """<!doctype html><title>shop</title><div id=result>running</div><script>
(async () => {
  const out = {};
  document.cookie = "site_pref=dark; Domain=example.test; Path=/; Secure";
  const edge = "https://t.example.test";
  out.beacon = navigator.sendBeacon(edge + "/track?k=beacon",
      new Blob([JSON.stringify({e: "beacon"})], {type: "text/plain"}));
  await new Promise(r => setTimeout(r, 500));
  const post = (path, k) => fetch(edge + path + "?k=" + k, {method: "POST", credentials: "include",
      keepalive: true, headers: {"Content-Type": "application/json"},
      body: JSON.stringify({e: k})});
  out.fetch1 = (await post("/track", "fetch1")).status;
  out.fetch2 = (await post("/collection", "fetch2")).status;
  out.cookie = document.cookie;
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})().catch(e => fetch("/result", {method: "POST", body: JSON.stringify({error: String(e)})}));
</script>"""


def _spki(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class Site:
    """https://www.example.test: the customer's page with the tag; collects the results."""

    def __init__(self, lt: LoopThread, leaf: trustme.LeafCert) -> None:
        self.lt, self.leaf, self.port = lt, leaf, 0
        self.result: dict | None = None

    async def _start(self) -> None:
        async def page(_: web.Request) -> web.Response:
            resp = web.Response(text=TAG, content_type="text/html")
            resp.set_cookie(
                "session",
                "SECRET",
                domain="example.test",
                path="/",
                secure=True,
                httponly=True,
                samesite="Lax",
            )
            return resp

        async def result(request: web.Request) -> web.Response:
            self.result = json.loads(await request.text())
            return web.Response(status=204)

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf.configure_cert(ctx)
        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_post("/result", result)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> Site:
        self.lt.run(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        self.lt.run(self.runner.cleanup())


@pytest.fixture(scope="module")
def browser_edge(
    tmp_path_factory, intermediate, upstream, chat_upstream, trust_bundle
) -> Iterator[tuple[Edge, trustme.LeafCert]]:
    work = tmp_path_factory.mktemp("browser")
    leaf = write_bundle(work / "certs", EDGE_HOST, intermediate)
    edge = Edge(work, base_config(work / "certs", upstream, chat_upstream, trust_bundle)).start()
    yield edge, leaf
    assert edge.stop() == 0


def _chromium_or_skip() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("EDGEPROXY_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


def test_tag_in_a_real_browser(
    browser_edge, intermediate, loop_thread, upstream: RawUpstream, tmp_path: Path
):
    _chromium_or_skip()
    edge, edge_leaf = browser_edge
    site_leaf = intermediate.issue_cert(SITE_HOST, key_type=RSA)
    n = len(upstream.seen)
    with Site(loop_thread, site_leaf) as site:
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--host-resolver-rules=MAP {EDGE_HOST} 127.0.0.1:{edge.port}, "
            f"MAP {SITE_HOST} 127.0.0.1:{site.port}",
            f"--ignore-certificate-errors-spki-list={_spki(edge_leaf)},{_spki(site_leaf)}",
            "--remote-debugging-port=0",
            f"https://{SITE_HOST}/",
        ]
        with (tmp_path / "chromium.log").open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 45
            while site.result is None and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_text = (tmp_path / "chromium.log").read_text(errors="replace")[-3000:]
        assert site.result is not None, f"the page never reported back:\n{log_text}"
    result = site.result
    assert "error" not in result, result
    assert result["beacon"] is True and result["fetch1"] == 200 and result["fetch2"] == 200
    # HttpOnly: the page's script can't see the edge's visitor id cookie
    assert "_ep_vid" not in result["cookie"] and "site_pref=dark" in result["cookie"]

    beacons = {
        s.target.split(b"=")[-1].decode(): s for s in upstream.seen[n:] if b"?k=" in s.target
    }
    assert set(beacons) == {"beacon", "fetch1", "fetch2"}, list(beacons)
    ids = {k: s.header(b"x-edge-visitor-id") for k, s in beacons.items()}
    # the id set on the first response came back on the later requests
    assert ids["fetch1"] == ids["fetch2"] == ids["beacon"], ids
    for s in beacons.values():
        sent = b"; ".join(s.header(b"cookie"))
        assert b"SECRET" not in sent and b"site_pref" not in sent
    assert beacons["fetch1"].header(b"cookie") == [b"_ep_vid=" + ids["fetch1"][0]]
    assert json.loads(beacons["fetch1"].body) == {"e": "fetch1"}
