"""The process model as an operator runs it: workers, signals, drain, metrics, bad config."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import DOMAINS, write_bundle
from tests.integration.conftest import base_config
from tests.support.client import Conn, build, request
from tests.support.edge import Edge

HOST = DOMAINS[0]


def _worker_pids(edge: Edge, at_least: int = 1) -> set[int]:
    return {line["pid"] for line in edge.wait_access(at_least)}


async def test_graceful_drain_finishes_in_flight_requests(
    tmp_path, certs_dir, upstream, chat_upstream, client_ctx, trust_bundle
):
    """SIGTERM: in-flight requests complete, new connections are refused, exit code 0."""
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["proxy"]["response_timeout"] = 5.0
    edge = Edge(tmp_path, config).start()
    try:
        slow = [
            asyncio.create_task(request(edge.port, HOST, client_ctx, "GET", "/track/slow?ms=1500"))
            for _ in range(3)
        ]
        idle = await Conn.open(edge.port, HOST, client_ctx)  # keep-alive, nothing in flight
        await asyncio.sleep(0.5)
        edge.signal(signal.SIGTERM)
        responses = await asyncio.gather(*slow)
        assert [r.status for r in responses] == [200, 200, 200]
        assert all(r.header(b"connection") == [b"close"] for r in responses)
        assert await idle.read_eof() == b""  # the idle connection was closed
        await idle.close()
        assert await asyncio.to_thread(edge.proc.wait, 15) == 0
        try:
            await Conn.open(edge.port, HOST, client_ctx)
            raise AssertionError("the edge still accepts connections after it stopped")
        except OSError:
            pass
    finally:
        edge.stop()


async def test_two_workers_both_serve_and_metrics_sum(
    tmp_path, certs_dir, upstream, chat_upstream, client_ctx, trust_bundle
):
    """workers = 2: connections spread over both processes; /metrics counts all of them."""
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["server"]["workers"] = 2
    edge = Edge(tmp_path, config).start()
    try:
        n = 40
        results = await asyncio.gather(
            *[request(edge.port, HOST, client_ctx, "POST", "/track", body=b"{}") for _ in range(n)]
        )
        assert all(r.status == 200 for r in results)
        assert len(_worker_pids(edge, n)) == 2
        count = await asyncio.to_thread(
            edge.wait_sample,
            "edgeproxy_request_duration_seconds_count",
            n,
            route="/track",
            status_class="2xx",
        )
        assert count == n
        assert edge.wait_sample("edgeproxy_tls_handshakes_total", n, result="ok") == n
        assert edge.sample("edgeproxy_workers_ready") == 2
    finally:
        assert edge.stop() == 0


async def test_a_killed_worker_is_replaced(
    tmp_path, certs_dir, upstream, chat_upstream, client_ctx, trust_bundle
):
    """SIGKILL to a worker: the supervisor starts another and traffic keeps flowing."""
    edge = Edge(tmp_path, base_config(certs_dir, upstream, chat_upstream, trust_bundle)).start()
    try:
        assert (await request(edge.port, HOST, client_ctx, "GET", "/track")).status == 200
        [victim] = _worker_pids(edge)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                resp = await request(edge.port, HOST, client_ctx, "GET", "/track", timeout=2)
                if resp.status == 200 and _worker_pids(edge) - {victim}:
                    break
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
        assert _worker_pids(edge) - {victim}, "no new worker served"
        assert "restarting" in edge.stderr()
    finally:
        assert edge.stop() == 0


def test_a_killed_edge_leaves_no_metrics_folder_behind_its_next_start(
    tmp_path, certs_dir, upstream, chat_upstream, trust_bundle
):
    """SIGKILL to the supervisor (the OOM killer) skips its cleanup; the next start removes
    the multiprocess metrics folder it left, and never a running edge's."""
    import copy
    import tempfile

    def folders(pid: int) -> list[Path]:
        return list(Path(tempfile.gettempdir()).glob(f"edgeproxy-metrics-{pid}-*"))

    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    killed, running, nxt = (Edge(tmp_path / d, copy.deepcopy(config)) for d in "abc")
    odd = Path(tempfile.gettempdir()) / f"edgeproxy-metrics-{'9' * 20}-{tmp_path.name}"
    try:
        killed.start()
        running.start()
        assert killed.proc is not None and running.proc is not None
        assert len(folders(killed.proc.pid)) == 1 and len(folders(running.proc.pid)) == 1
        killed.proc.kill()
        killed.proc.wait(5)
        assert len(folders(killed.proc.pid)) == 1  # left behind
        odd.mkdir()  # a name no supervisor made: neither removed nor a crash
        nxt.start()
        assert folders(killed.proc.pid) == []
        assert len(folders(running.proc.pid)) == 1
        assert running.get("/readyz")[0] == 200
        assert odd.is_dir()
    finally:
        for edge in (killed, running, nxt):
            edge.stop()
        if odd.is_dir():
            odd.rmdir()


async def test_sighup_rescans_certificates(
    tmp_path, intermediate, upstream, chat_upstream, client_ctx, trust_bundle
):
    """A bundle added on disk is served after SIGHUP, without a restart."""
    certs = tmp_path / "certs"
    write_bundle(certs, HOST, intermediate)
    edge = Edge(tmp_path, base_config(certs, upstream, chat_upstream, trust_bundle)).start()
    try:
        new = "t.gamma.test"
        write_bundle(certs, new, intermediate)
        edge.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        status = 0
        while time.monotonic() < deadline and status != 200:
            try:
                status = (await request(edge.port, new, client_ctx, "GET", "/track")).status
            except OSError:
                await asyncio.sleep(0.1)
        assert status == 200
    finally:
        edge.stop()


def test_health_and_readiness(edge):
    status, body = edge.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = edge.get("/readyz")
    doc = json.loads(body)
    assert status == 200
    assert (doc["workers_ready"], doc["certificates"]) == (1, len(DOMAINS))
    assert doc["certificates_in_every_worker"] == len(DOMAINS)


def test_metrics_exposition_has_the_contract_names(edge):
    text = edge.metrics()
    for name in (
        "edgeproxy_request_duration_seconds_bucket",
        "edgeproxy_upstream_duration_seconds_bucket",
        "edgeproxy_tls_handshakes_total",
        "edgeproxy_connections_active",
        "edgeproxy_build_info",
    ):
        assert name in text
    assert 'le="0.0005"' in text  # sub-millisecond buckets


def test_bad_config_is_refused_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:0"]\nworkers = "two"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "server.workers" in proc.stderr


def test_port_in_use_is_refused_naming_the_address(tmp_path, edge):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{edge.port}"]\n[metrics]\nlisten = ""\n')
    proc = subprocess.run(
        [sys.executable, "-m", "edgeproxy", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"127.0.0.1:{edge.port}" in proc.stderr


async def test_connections_active_gauge(edge, client_ctx):
    conn = await Conn.open(edge.port, HOST, client_ctx)
    conn.send(build("GET", "/track", HOST))
    await conn.read_responses()
    deadline = time.monotonic() + 3  # the gauge is set a few times a second
    while edge.sample("edgeproxy_connections_active") < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert edge.sample("edgeproxy_connections_active") >= 1
    await conn.close()


async def test_a_request_cut_at_the_drain_deadline_still_gets_its_access_line(
    tmp_path, certs_dir, upstream, chat_upstream, trust_bundle, client_ctx
):
    """Access lines are written in batches; the ones of requests aborted when the drain
    deadline passes are made after the abort, and must still be written before exit."""
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    config["server"]["drain_timeout"] = 0.5
    config["proxy"]["response_timeout"] = 10.0
    edge = Edge(tmp_path, config).start()
    try:
        conn = await Conn.open(edge.port, HOST, client_ctx)
        conn.send(build("GET", "/general/slow?ms=5000", HOST))
        await asyncio.sleep(0.5)
        edge.signal(signal.SIGTERM)
        assert edge.proc is not None
        await asyncio.to_thread(edge.proc.wait, 15)
    finally:
        edge.stop()
    lines = [line for line in edge.access() if line.get("path") == "/general/slow"]
    assert [line["status"] for line in lines] == [499]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_file_descriptors_pauses_accepting_then_recovers(
    tmp_path, certs_dir, upstream, chat_upstream, client_ctx, trust_bundle
):
    """A worker out of descriptors (EMFILE) stops accepting for a moment instead of spinning
    on a listener that stays readable, warns once, and serves again once descriptors free
    up (tls/transport.TLSListener)."""
    edge = Edge(tmp_path, base_config(certs_dir, upstream, chat_upstream, trust_bundle)).start()
    held: list[socket.socket] = []
    try:
        assert (await request(edge.port, HOST, client_ctx, "GET", "/track")).status == 200
        (pid,) = _worker_pids(edge)
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, limits[1]))
        try:
            # Three take the last descriptors (their handshakes never start); the rest wait
            # in the backlog, and the listening socket stays readable all along.
            held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(10)]
            await asyncio.sleep(0.3)
            before = _cpu_seconds(pid)
            await asyncio.sleep(1.0)
            spent = _cpu_seconds(pid) - before
            assert spent < 0.3, f"the worker spun: {spent:.2f} CPU-s in 1 s"
            assert edge.stderr().count("accept failed") == 1, edge.stderr()[-2000:]
            for s in held:  # the edge closes their halves: descriptors come free
                s.close()
            held = []
            deadline = time.monotonic() + 10
            while True:  # (the backlog's closed connections are accepted and dropped first)
                try:
                    r = await request(edge.port, HOST, client_ctx, "GET", "/track", timeout=3)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert r.status == 200
            assert edge.proc.poll() is None
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    finally:
        for s in held:
            s.close()
        edge.stop()
