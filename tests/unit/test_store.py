"""The worker's CertStore and SNI selection, driven directly (no sockets)."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from edgeproxy.tls.sni import SNI_ATTR, HandshakeTally, install_sni_callback, new_server_context
from edgeproxy.tls.store import CertStore, is_domain_name
from tests.conftest import RSA


def _serve(served: Path, domain: str, issuer: trustme.CA) -> None:
    leaf = issuer.issue_cert(domain, key_type=RSA)
    served.mkdir(parents=True, exist_ok=True)
    data = leaf.private_key_pem.bytes() + b"".join(b.bytes() for b in leaf.cert_chain_pems)
    (served / f"{domain}.pem").write_bytes(data)


def test_scan_indexes_served_files_only(tmp_path, intermediate):
    _serve(tmp_path, "t.good.test", intermediate)
    (tmp_path / ".tmp-1-t.other.test.pem.part").write_text("half written")
    (tmp_path / "Not_A_Domain.pem").write_text("x")
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    assert store.index == {"t.good.test"}
    assert store.context_for("t.good.test") is not None
    assert store.context_for("t.other.test") is None


def test_refresh_swaps_a_cached_context_and_drops_a_removed_one(tmp_path, intermediate):
    _serve(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    first = store.context_for("t.good.test")
    _serve(tmp_path, "t.good.test", intermediate)
    store.refresh("t.good.test")
    second = store.context_for("t.good.test")
    assert second is not None and second is not first
    (tmp_path / "t.good.test.pem").unlink()
    store.refresh("t.good.test")
    assert store.context_for("t.good.test") is None


def test_cache_is_bounded_and_rebuilds_on_demand(tmp_path, intermediate):
    for i in range(5):
        _serve(tmp_path, f"t.d{i}.test", intermediate)
    store = CertStore(tmp_path, cache_size=2)
    store.scan()
    for i in range(5):
        assert store.context_for(f"t.d{i}.test") is not None
    assert len(store._cache) == 2
    assert store.context_for("t.d0.test") is not None  # evicted, rebuilt
    assert len(store._cache) == 2


def test_unknown_names_allocate_nothing(tmp_path, intermediate):
    _serve(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    for i in range(1000):
        assert store.context_for(f"t.random{i}.test") is None
    assert len(store._cache) == 0 and store.index == {"t.good.test"}


def test_sni_callback_refuses_unknown_and_missing_names(tmp_path, intermediate):
    _serve(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    tally = HandshakeTally()
    base = new_server_context()
    install_sni_callback(base, store.context_for, tally)
    cb = base.sni_callback
    assert cb is not None
    sslobj = base.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert cb(sslobj, None, base) == ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    assert cb(sslobj, "t.other.test", base) == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    assert cb(sslobj, "T.Good.Test.", base) is None
    assert sslobj.context is store.context_for("t.good.test")
    assert tally.counts == {"ok": 0, "no_sni": 1, "unknown_sni": 1, "error": 0}
    tally.failed()  # claims one refusal, so it's no error
    tally.failed()
    tally.failed()
    flushed: dict[str, int] = {}
    tally.flush(flushed.__setitem__)
    assert flushed == {"no_sni": 1, "unknown_sni": 1, "error": 1}
    assert set(tally.counts.values()) == {0}  # handed over once


def test_domain_names():
    assert is_domain_name("t.example.com") and is_domain_name("t.xn--bcher-kva.test")
    for bad in (
        "localhost",
        "*.example.com",
        "T.example.com",
        "a..b",
        "../x",
        "1.2.3.4",
        "x.-a",
        "t.example.com.",
        "t.exa_mple.com",
    ):
        assert not is_domain_name(bad), bad


async def test_a_file_published_before_the_watch_starts_is_picked_up(tmp_path, intermediate):
    """Published between a worker's first scan and its watch being in place: no event comes,
    so the watch scans once it is in place (this once left a worker unready for 60 s)."""
    import asyncio

    from edgeproxy.tls.follow import watch_served

    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    _serve(tmp_path, "t.early.test", intermediate)  # no watcher yet
    stop = asyncio.Event()
    changes: list[int] = []
    task = asyncio.ensure_future(
        watch_served(
            store,
            stop,
            rescan_interval=60.0,
            on_change=lambda: changes.append(len(store)),
        )
    )
    try:
        for _ in range(100):
            if store.index == {"t.early.test"}:
                break
            await asyncio.sleep(0.02)
        assert store.index == {"t.early.test"}
        assert changes and changes[-1] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def test_server_objects_call_the_c_methods_and_still_handshake(tmp_path, intermediate, client_ctx):
    """new_server_context's SSLObjects hand uvloop the C read/write/pending/do_handshake
    (no ssl.py frame per TLS record) and still do everything an SSLObject does: SNI
    selection, a handshake, data both ways."""
    _serve(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    base = new_server_context()
    install_sni_callback(base, store.context_for, HandshakeTally())
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = base.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="t.good.test")
    for name in ("read", "write", "pending", "do_handshake"):
        assert getattr(server, name).__self__ is server._sslobj, name  # the C object's own
    done = {server: False, client: False}
    for _ in range(10):  # pump the two BIO pairs until both sides are done
        for obj, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values())
    assert getattr(server, SNI_ATTR) == "t.good.test"
    client.write(b"POST /track")
    s_in.write(c_out.read())
    assert server.pending() == 0 and server.read(100) == b"POST /track"
    server.write(b"HTTP/1.1 204")
    c_in.write(s_out.read())
    assert client.read(100) == b"HTTP/1.1 204"
