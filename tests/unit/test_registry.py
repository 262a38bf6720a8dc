"""The registry over a real certificates folder: validate, publish, keep the last good."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from edgeproxy.tls.registry import CertRegistry, CertState
from edgeproxy.tls.source import DirectorySource, InFlight
from tests.conftest import RSA, write_bundle


@pytest.fixture
def roots(ca: trustme.CA):
    r = (x509.load_pem_x509_certificate(ca.cert_pem.bytes()),)
    return lambda: r


def _registry(tmp_path: Path, roots) -> CertRegistry:
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    reg = CertRegistry(DirectorySource(certs), tmp_path / "state", roots)
    reg.open()
    return reg


def _sync(reg: CertRegistry) -> dict[str, str]:
    return {d: reg.refresh(d) for d in sorted(reg.changed())}


def test_good_bundle_is_published_with_a_private_mode(tmp_path, intermediate, roots):
    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    assert _sync(reg) == {"t.a.test": "loaded"}
    served = tmp_path / "state" / "served" / "t.a.test.pem"
    assert served.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert oct(served.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    assert reg.entries["t.a.test"].state(0) == CertState.ACTIVE
    assert reg.counts == {"loaded": 1, "rejected": 0, "removed": 0, "failed": 0}


def test_bad_rewrite_keeps_the_last_good_bundle(tmp_path, intermediate, roots, caplog):
    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    _sync(reg)
    served = tmp_path / "state" / "served" / "t.a.test.pem"
    good = served.read_bytes()
    (tmp_path / "certs" / "t.a.test" / "privkey.pem").write_text("garbage")
    assert _sync(reg) == {"t.a.test": "rejected"}
    assert served.read_bytes() == good
    entry = reg.entries["t.a.test"]
    assert entry.served is not None and entry.state(0) == CertState.INVALID
    assert "privkey.pem: not a PEM private key" in entry.errors[0]
    assert "keeping the last good one" in caplog.text
    assert _sync(reg) == {}  # the same bad version is not retried until it changes


def test_wildcard_is_rejected_and_never_served(tmp_path, intermediate, roots):
    reg = _registry(tmp_path, roots)
    leaf = intermediate.issue_cert("*.a.test", key_type=RSA)
    folder = tmp_path / "certs" / "t.a.test"
    folder.mkdir(parents=True)
    (folder / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (folder / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
    assert _sync(reg) == {"t.a.test": "rejected"}
    assert not (tmp_path / "state" / "served" / "t.a.test.pem").exists()


def test_removing_the_folder_removes_the_domain(tmp_path, intermediate, roots):
    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    _sync(reg)
    (tmp_path / "certs" / "t.a.test" / "privkey.pem").unlink()
    with pytest.raises(InFlight):  # one file of the two: a write in progress
        reg.source.read("t.a.test")
    assert reg.refresh("t.a.test") == "inflight"
    (tmp_path / "certs" / "t.a.test" / "fullchain.pem").unlink()
    # an empty folder: registered, awaiting files; what was served stays served
    assert reg.refresh("t.a.test") == "unchanged"
    assert (tmp_path / "state" / "served" / "t.a.test.pem").exists()
    (tmp_path / "certs" / "t.a.test").rmdir()
    assert _sync(reg) == {"t.a.test": "removed"}
    assert not (tmp_path / "state" / "served" / "t.a.test.pem").exists()


def test_a_shared_key_on_disk_is_served_with_a_warning(tmp_path, intermediate, roots, caplog):
    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    _sync(reg)
    folder = tmp_path / "certs" / "t.b.test"
    folder.mkdir()
    key = (tmp_path / "certs" / "t.a.test" / "privkey.pem").read_bytes()
    # a certificate for t.b.test on t.a.test's key
    from cryptography.hazmat.primitives import serialization

    from edgeproxy.demo import Issuer, issue_leaf, pem

    cert, _ = issue_leaf(
        Issuer(intermediate._certificate, intermediate._private_key),
        "t.b.test",
        key=serialization.load_pem_private_key(key, None),
    )  # type: ignore[arg-type]
    (folder / "fullchain.pem").write_bytes(pem(cert) + intermediate.cert_pem.bytes())
    (folder / "privkey.pem").write_bytes(key)
    assert _sync(reg) == {"t.b.test": "loaded"}
    assert "already registered for t.a.test" in caplog.text


def test_a_batch_is_refreshed_in_order_and_synced_once(tmp_path, intermediate, roots, monkeypatch):
    """A start or rescan refreshes in batches: each domain's outcome, in the order asked, and
    one filesystem sync for the batch instead of an fsync per served file. The index is
    written only after a sync: it never vouches for a served file that isn't on disk."""
    import edgeproxy.tls.registry as registry_module

    reg = _registry(tmp_path, roots)
    for d in ("t.a.test", "t.c.test"):
        write_bundle(tmp_path / "certs", d, intermediate)
    (tmp_path / "certs" / "t.b.test").mkdir()  # registered, no files yet
    bad = tmp_path / "certs" / "t.d.test"
    bad.mkdir()
    (bad / "fullchain.pem").write_text("not a certificate")
    (bad / "privkey.pem").write_text("not a key")
    syncs: list[tuple[Path, bool]] = []
    fsyncs: list[int] = []
    real_sync = registry_module.sync_filesystem

    def counted_sync(folder: Path) -> None:
        syncs.append((folder, reg.index_file.exists()))
        real_sync(folder)

    monkeypatch.setattr(registry_module, "sync_filesystem", counted_sync)
    monkeypatch.setattr(registry_module.os, "fsync", lambda fd: fsyncs.append(fd))

    domains = ["t.d.test", "t.c.test", "t.b.test", "t.a.test", "t.gone.test"]
    assert reg.refresh_many(domains) == ["rejected", "loaded", "registered", "loaded", "unchanged"]
    assert syncs == [(reg.served_dir, False)] and fsyncs == []
    served = sorted(p.name for p in reg.served_dir.iterdir())
    assert served == ["t.a.test.pem", "t.c.test.pem"]
    # one domain (a swap): published with its own fsync, as before
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    assert reg.refresh_many(["t.a.test"]) == ["loaded"]
    assert len(syncs) == 1 and len(fsyncs) == 1
    reg.save()
    assert syncs[1] == (reg.served_dir, False) and reg.index_file.exists()
    # a batch that replaces served files fsyncs each before its rename: old or new, never
    # neither after a power cut
    fsyncs.clear()
    for d in ("t.a.test", "t.c.test"):
        write_bundle(tmp_path / "certs", d, intermediate)
    assert reg.refresh_many(["t.a.test", "t.c.test"]) == ["loaded", "loaded"]
    assert len(fsyncs) == 2 and len(syncs) == 3


def test_a_bundle_that_cannot_be_written_keeps_what_is_served(
    tmp_path, intermediate, roots, monkeypatch, caplog
):
    """A full disk while publishing: the domain keeps its last good bundle, the failure is
    counted and logged, the rest of the batch goes on, and the next rescan tries again."""
    import errno

    import edgeproxy.tls.registry as registry_module

    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    assert _sync(reg) == {"t.a.test": "loaded"}
    served = reg.served_dir / "t.a.test.pem"
    good, version = served.read_bytes(), reg.entries["t.a.test"].served.version
    for d in ("t.a.test", "t.b.test"):
        write_bundle(tmp_path / "certs", d, intermediate)
    real_write = registry_module.atomic_write

    def full_disk(path: Path, data: bytes, durable: bool = True) -> None:
        if path.name == "t.a.test.pem":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, durable)

    monkeypatch.setattr(registry_module, "atomic_write", full_disk)
    assert reg.refresh_many(["t.a.test", "t.b.test"]) == ["failed", "loaded"]
    assert served.read_bytes() == good
    assert reg.entries["t.a.test"].served.version == version
    assert reg.counts["failed"] == 1 and "could not publish the certificate for t.a.test" in (
        caplog.text
    )
    monkeypatch.setattr(registry_module, "atomic_write", real_write)
    assert _sync(reg) == {"t.a.test": "loaded"}  # what a rescan does
    assert served.read_bytes() != good


def _saved(tmp_path: Path, roots, intermediate) -> CertRegistry:
    """A registry that validated t.a.test and t.b.test and saved its index."""
    reg = _registry(tmp_path, roots)
    for d in ("t.a.test", "t.b.test"):
        write_bundle(tmp_path / "certs", d, intermediate)
    _sync(reg)
    reg.save()
    return reg


def test_restart_revalidates_only_what_changed(tmp_path, intermediate, roots):
    reg = _saved(tmp_path, roots, intermediate)
    write_bundle(tmp_path / "certs", "t.b.test", intermediate)  # changed while down
    again = _registry(tmp_path, roots)
    assert again.changed() == {"t.b.test"}
    assert again.entries["t.a.test"] == reg.entries["t.a.test"]  # the index round-trips
    assert again.served_count() == 2


def test_restart_revalidates_a_domain_whose_served_file_is_gone(tmp_path, intermediate, roots):
    _saved(tmp_path, roots, intermediate)
    (tmp_path / "state" / "served" / "t.a.test.pem").unlink()
    again = _registry(tmp_path, roots)
    assert again.changed() == {"t.a.test"}
    assert _sync(again) == {"t.a.test": "loaded"}


def test_an_index_of_the_first_format_is_still_read(tmp_path, intermediate, roots):
    """Upgrading must not revalidate every domain (minutes at 100k)."""
    import json

    reg = _registry(tmp_path, roots)
    write_bundle(tmp_path / "certs", "t.a.test", intermediate)
    _sync(reg)
    e = reg.entries["t.a.test"]
    assert e.served is not None
    v1 = {
        "version": 1,
        "domains": {
            "t.a.test": {
                "domain": "t.a.test",
                "served": {
                    "version": e.served.version,
                    "not_after": e.served.not_after,
                    "cert_sha256": e.served.cert_sha256,
                    "spki_sha256": e.served.spki_sha256,
                    "validated_at": e.served.validated_at,
                    "warnings": [],
                },
                "rejected_version": None,
                "errors": [],
                "updated_at": e.updated_at,
            }
        },
    }
    (tmp_path / "state" / "index.json").write_text(json.dumps(v1))
    again = _registry(tmp_path, roots)
    assert again.changed() == set()
    assert again.entries["t.a.test"] == e


def test_kubernetes_secret_layout(tmp_path, intermediate, roots):
    """Files linked through ..data, swapped atomically, are followed and picked up."""
    reg = _registry(tmp_path, roots)
    folder = tmp_path / "certs" / "t.k.test"
    folder.mkdir()

    def publish(gen: str) -> None:
        data = folder / gen
        data.mkdir()
        leaf = intermediate.issue_cert("t.k.test", key_type=RSA)
        (data / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (data / "privkey.pem").write_bytes(leaf.private_key_pem.bytes())
        os.symlink(gen, folder / "..data_tmp")
        os.replace(folder / "..data_tmp", folder / "..data")

    publish("..2026_11_27_a")
    for name in ("fullchain.pem", "privkey.pem"):
        os.symlink(f"..data/{name}", folder / name)
    assert _sync(reg) == {"t.k.test": "loaded"}
    first = reg.entries["t.k.test"].served
    publish("..2026_11_27_b")
    assert _sync(reg) == {"t.k.test": "loaded"}
    assert reg.entries["t.k.test"].served.cert_sha256 != first.cert_sha256


async def test_a_restart_serves_the_last_runs_bundles_while_it_resyncs(
    tmp_path, intermediate, roots
):
    """At a restart the served folder already holds what the last run validated: the edge is
    ready at once, while the stat-everything sync (seconds at 100k) runs behind. At a first
    start there is nothing validated yet, so readiness waits for the sync."""
    import asyncio
    import threading

    from edgeproxy.reload import run_registry

    gate = threading.Event()

    class SlowSource(DirectorySource):
        def versions(self) -> Iterator[tuple[str, str]]:
            gate.wait(10)
            return super().versions()

    async def start(reg: CertRegistry) -> tuple[asyncio.Event, asyncio.Task]:
        stop = asyncio.Event()
        return stop, asyncio.ensure_future(run_registry(reg, reg.source, stop, 60.0))

    async def until(cond, seconds: float = 5.0) -> bool:
        for _ in range(int(seconds / 0.01)):
            if cond():
                return True
            await asyncio.sleep(0.01)
        return cond()

    certs = tmp_path / "certs"
    certs.mkdir()
    write_bundle(certs, "t.a.test", intermediate)
    first = CertRegistry(SlowSource(certs), tmp_path / "state", roots)
    stop, task = await start(first)
    await asyncio.sleep(0.2)
    assert not first.serving and not first.synced  # first start: nothing validated yet
    gate.set()
    assert await until(lambda: first.synced)
    assert first.serving and first.served_count() == 1
    stop.set()
    await asyncio.wait_for(task, 5)
    first.save()

    gate.clear()
    again = CertRegistry(SlowSource(certs), tmp_path / "state", roots)
    stop, task = await start(again)
    assert await until(lambda: again.serving)
    assert not again.synced and again.served_count() == 1
    gate.set()
    assert await until(lambda: again.synced)
    stop.set()
    await asyncio.wait_for(task, 5)


def test_a_two_file_update_read_between_its_writes_is_not_rejected(tmp_path, intermediate, roots):
    """New certificate, old key: certbot between its two writes. Read again, not rejected."""
    reg = _saved(tmp_path, roots, intermediate)
    folder = tmp_path / "certs" / "t.a.test"
    write_bundle(tmp_path / "next", "t.a.test", intermediate)
    (folder / "fullchain.pem").write_bytes((tmp_path / "next/t.a.test/fullchain.pem").read_bytes())
    assert reg.refresh("t.a.test") == "inflight"
    (folder / "privkey.pem").write_bytes((tmp_path / "next/t.a.test/privkey.pem").read_bytes())
    assert reg.refresh("t.a.test") == "loaded"
    assert reg.counts["rejected"] == 0


def test_a_mismatch_that_stays_is_rejected_after_the_grace(
    tmp_path, intermediate, roots, monkeypatch
):
    monkeypatch.setattr("edgeproxy.tls.registry.MISMATCH_GRACE", 0.05)
    reg = _saved(tmp_path, roots, intermediate)
    write_bundle(tmp_path / "next", "t.a.test", intermediate)
    chain = (tmp_path / "next/t.a.test/fullchain.pem").read_bytes()
    (tmp_path / "certs/t.a.test/fullchain.pem").write_bytes(chain)
    assert reg.refresh("t.a.test") == "inflight"
    time.sleep(0.06)
    assert reg.refresh("t.a.test") == "rejected"
    assert reg.counts["rejected"] == 1
    assert reg.entries["t.a.test"].served is not None  # the last good one stays served
