"""What a connection leaves behind in a worker once it is over: nothing for the cycle
collector. A reference cycle through a connection's objects keeps the whole connection,
its TLS object (tens of KiB) and buffers, alive until the next collection; on the beacon
path that cost ~10% of a keep-alive beacon's CPU time (bench/RESULTS.md, session 6)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.conftest import DOMAINS
from tests.integration.conftest import base_config
from tests.support.client import Conn, build, request
from tests.support.edge import Edge

HOST = DOMAINS[0]
GCWATCH = Path(__file__).resolve().parent.parent / "support" / "gcwatch"
# The objects of one client connection (tls/_conn.c or tls/transport.py, proxy/forward.py).
CONNECTION_TYPES = {
    "TLSConnection",
    "TLSTransport",
    "ConnSocket",
    "_SSLSocket",
    "ClientConnection",
    "Request",
    "Exchange",
    "FirstParty",
}


async def test_connections_are_freed_without_the_cycle_collector(
    tmp_path, certs_dir, upstream, chat_upstream, client_ctx, trust_bundle
):
    watch = tmp_path / "gcwatch"
    watch.mkdir()
    edge = Edge(tmp_path, base_config(certs_dir, upstream, chat_upstream, trust_bundle))
    edge.start(env={"PYTHONPATH": str(GCWATCH), "GCWATCH_DIR": str(watch)})
    try:
        beacon = [("Content-Type", "application/json")]
        for _ in range(10):  # a forwarded beacon per connection
            r = await request(edge.port, HOST, client_ctx, "POST", "/track", beacon, b"{}")
            assert r.status == 200
        kept = await Conn.open(edge.port, HOST, client_ctx)  # keep-alive: forwarded, answered
        for _ in range(10):
            kept.send(build("POST", "/track", HOST, beacon, b"{}"))
        for path in ["/nowhere"] * 3 + ["/general/dead"]:  # (a POST refused early closes)
            kept.send(build("GET", path, HOST))
        statuses = [r.status for r in await kept.read_responses(14)]
        assert statuses == [200] * 10 + [404] * 3 + [502], statuses
        await kept.close()
        cut = await Conn.open(edge.port, HOST, client_ctx)  # gone with its body half sent
        cut.send(build("POST", "/track", HOST, [("Content-Length", "100")]) + b"{")
        await asyncio.sleep(0.2)
        await cut.close()
        await asyncio.sleep(0.5)  # (connection_lost runs on the worker's next loop turn)

        (worker,) = {line["pid"] for line in edge.wait_access(24)}
        (watch / "collect").touch()
        report = watch / f"garbage.{worker}.json"
        deadline = time.monotonic() + 10
        while not report.exists():
            assert time.monotonic() < deadline, "the worker wrote no garbage report"
            await asyncio.sleep(0.05)
        garbage = json.loads(report.read_text())
        left = {t: n for t, n in garbage.items() if t in CONNECTION_TYPES}
        assert not left, f"connection objects reached the cycle collector: {left}"
    finally:
        edge.stop()
