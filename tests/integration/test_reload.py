"""Hot reload on a running edge (two workers): add, replace, remove, bad writes, symlink
swaps, all under a handshake loop that must never fail."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import RSA, write_bundle
from tests.integration.conftest import base_config
from tests.support.client import Conn, request
from tests.support.edge import Edge

A = "t.reload-a.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reload-certs")


@pytest.fixture(scope="module")
def edge2(
    tmp_path_factory, certs, intermediate, upstream, chat_upstream, trust_bundle
) -> Iterator[Edge]:
    write_bundle(certs, A, intermediate)
    config = base_config(certs, upstream, chat_upstream, trust_bundle)
    config["server"]["workers"] = 2
    e = Edge(tmp_path_factory.mktemp("edge2"), config).start()
    yield e
    assert e.stop() == 0
    assert "Traceback" not in e.stderr(), e.stderr()


def _leaf_sha(leaf: trustme.LeafCert) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def _served_sha(port: int, sni: str, ctx: ssl.SSLContext) -> str | None:
    try:
        conn = await Conn.open(port, sni, ctx)
    except (OSError, ssl.SSLError):
        return None
    try:
        return hashlib.sha256(conn.peer_cert()).hexdigest()
    finally:
        await conn.close()


async def _wait_for(port, sni, ctx, want: str | None, timeout: float = 1.0) -> float:
    """Seconds until new handshakes serve `want` (None: refused); fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await _served_sha(port, sni, ctx) == want:
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise AssertionError(f"{sni} did not switch within {timeout}s")


def _replace(folder: Path, leaf: trustme.LeafCert) -> None:
    """What a careful operator does: write temp files, rename them over the old ones."""
    (folder / "fullchain.tmp").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (folder / "privkey.tmp").write_bytes(leaf.private_key_pem.bytes())
    os.replace(folder / "fullchain.tmp", folder / "fullchain.pem")
    os.replace(folder / "privkey.tmp", folder / "privkey.pem")


class HandshakeLoop:
    """Full handshakes + a beacon, back to back, counting anything that fails."""

    def __init__(self, port: int, sni: str, ctx: ssl.SSLContext) -> None:
        self.port, self.sni, self.ctx = port, sni, ctx
        self.ok = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                r = await request(self.port, self.sni, self.ctx, "POST", "/track", body=b"{}")
                if r.status != 200:
                    self.failures.append(f"status {r.status}")
                else:
                    self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failures.append(repr(exc))

    def __enter__(self) -> HandshakeLoop:
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        await self.task


async def test_replace_under_load_switches_within_a_second_with_no_failure(
    edge2, certs, intermediate, client_ctx
):
    loop = HandshakeLoop(edge2.port, A, client_ctx).__enter__()
    await asyncio.sleep(0.3)
    timings = []
    for _ in range(3):
        leaf = intermediate.issue_cert(A, key_type=RSA)
        _replace(certs / A, leaf)
        timings.append(await _wait_for(edge2.port, A, client_ctx, _leaf_sha(leaf)))
    await asyncio.sleep(0.2)
    await loop.stop()
    assert loop.failures == []
    assert loop.ok > 20
    assert max(timings) < 1.0
    # both workers switched: every new connection (spread over both) sees the last one
    shas = {await _served_sha(edge2.port, A, client_ctx) for _ in range(20)}
    assert shas == {_leaf_sha(leaf)}


async def test_bad_write_keeps_the_last_good_certificate(edge2, certs, intermediate, client_ctx):
    good = intermediate.issue_cert(A, key_type=RSA)
    _replace(certs / A, good)
    await _wait_for(edge2.port, A, client_ctx, _leaf_sha(good))
    before = edge2.sample("edgeproxy_cert_reloads_total", result="rejected")
    loop = HandshakeLoop(edge2.port, A, client_ctx).__enter__()
    (certs / A / "privkey.pem").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    wildcard = intermediate.issue_cert("*.reload-a.test", key_type=RSA)
    _replace(certs / A, wildcard)
    deadline = time.monotonic() + 3
    while edge2.sample("edgeproxy_cert_reloads_total", result="rejected") == before:
        assert time.monotonic() < deadline, "the bad write was not noticed"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await loop.stop()
    assert loop.failures == []
    assert await _served_sha(edge2.port, A, client_ctx) == _leaf_sha(good)
    assert edge2.sample("edgeproxy_certs", state="invalid") == 1
    assert "rejected" in edge2.stderr() and "wildcard" in edge2.stderr()
    _replace(certs / A, good)  # repaired
    await asyncio.sleep(0.5)
    assert edge2.sample("edgeproxy_certs", state="invalid") == 0


async def test_truncated_file_then_completed(edge2, certs, intermediate, client_ctx):
    """A writer that writes in two pieces: the half file is never served, the whole one is."""
    leaf = intermediate.issue_cert(A, key_type=RSA)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    old = await _served_sha(edge2.port, A, client_ctx)
    (certs / A / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
    with (certs / A / "fullchain.pem").open("wb") as f:
        f.write(chain[: len(chain) // 2])
        f.flush()
        await asyncio.sleep(0.3)
        assert await _served_sha(edge2.port, A, client_ctx) == old
        f.write(chain[len(chain) // 2 :])
    await _wait_for(edge2.port, A, client_ctx, _leaf_sha(leaf))


async def test_add_and_remove_a_domain(edge2, certs, intermediate, client_ctx):
    new = "t.reload-new.test"
    assert await _served_sha(edge2.port, new, client_ctx) is None
    leaf = write_bundle(certs, new, intermediate)
    added = await _wait_for(edge2.port, new, client_ctx, _leaf_sha(leaf))
    for f in (certs / new).iterdir():
        f.unlink()
    (certs / new).rmdir()
    removed = await _wait_for(edge2.port, new, client_ctx, None)
    assert added < 1 and removed < 1
    deadline = time.monotonic() + 2
    while edge2.sample("edgeproxy_cert_reloads_total", result="removed") < 1:
        assert time.monotonic() < deadline, "the removal was not counted"
        await asyncio.sleep(0.05)


async def test_kubernetes_data_symlink_swap(edge2, certs, intermediate, client_ctx):
    name = "t.reload-k8s.test"
    folder = certs / name
    folder.mkdir()

    def publish(gen: str) -> trustme.LeafCert:
        leaf = intermediate.issue_cert(name, key_type=RSA)
        (folder / gen).mkdir()
        (folder / gen / "fullchain.pem").write_bytes(
            b"".join(b.bytes() for b in leaf.cert_chain_pems)
        )
        (folder / gen / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
        os.symlink(gen, folder / "..data_tmp")
        os.replace(folder / "..data_tmp", folder / "..data")
        return leaf

    first = publish("..gen1")
    for f in ("fullchain.pem", "privkey.pem"):
        os.symlink(f"..data/{f}", folder / f)
    await _wait_for(edge2.port, name, client_ctx, _leaf_sha(first))
    second = publish("..gen2")
    assert await _wait_for(edge2.port, name, client_ctx, _leaf_sha(second)) < 1


def test_expiry_metrics(edge2):
    text = edge2.metrics()
    assert f'edgeproxy_cert_not_after_timestamp_seconds{{domain="{A}"}}' in text
    assert edge2.sample("edgeproxy_certs", state="active") >= 1
    assert edge2.sample("edgeproxy_cert_reload_last_success_timestamp_seconds") > 1.7e9
