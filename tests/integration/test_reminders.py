"""Expiry reminders from a running edge to a real webhook, once across restarts."""

from __future__ import annotations

import datetime as dt
import json
import time

from aiohttp import web

from tests.conftest import RSA
from tests.integration.conftest import base_config
from tests.support.edge import Edge
from tests.support.upstream import LoopThread


class Webhook:
    def __init__(self, lt: LoopThread) -> None:
        self.lt, self.got, self.port = lt, [], 0

    async def _start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.got.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> Webhook:
        self.lt.run(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        self.lt.run(self.runner.cleanup())


def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reminder_is_posted_once_across_restarts(
    tmp_path, loop_thread, intermediate, upstream, chat_upstream, trust_bundle
):
    certs = tmp_path / "certs"
    now = dt.datetime.now(dt.UTC)
    leaf = intermediate.issue_cert(
        "t.soon.test", key_type=RSA, not_after=now + dt.timedelta(days=20)
    )
    folder = certs / "t.soon.test"
    folder.mkdir(parents=True)
    (folder / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (folder / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
    with Webhook(loop_thread) as hook:
        config = base_config(certs, upstream, chat_upstream, trust_bundle)
        config["notify"] = {"webhook_url": f"http://127.0.0.1:{hook.port}/hook"}
        config["certs"]["state_dir"] = str(tmp_path / "state")
        edge = Edge(tmp_path, config).start()
        try:
            _wait(lambda: len(hook.got) == 1)
            doc = hook.got[0]
            assert (doc["event"], doc["domain"], doc["threshold_days"]) == (
                "certificate_expiring",
                "t.soon.test",
                30,
            )
            assert 19 <= doc["days_left"] <= 20
            assert edge.sample("edgeproxy_certs", state="expiring") == 1
        finally:
            assert edge.stop() == 0
        edge = Edge(tmp_path, config).start()  # same state folder: a restart
        try:
            time.sleep(1.0)
            assert len(hook.got) == 1
            ledger = json.loads((tmp_path / "state" / "notified.json").read_text())
            assert len(ledger["sent"]) == 2  # the 30- and 60-day thresholds, sent as one
        finally:
            assert edge.stop() == 0
