"""CertStore and SNI selection, driven directly (no sockets)."""

from __future__ import annotations

import ssl

from edgeproxy.tls.sni import HandshakeTally, install_sni_callback, new_server_context
from edgeproxy.tls.store import CertStore, is_domain_name
from tests.conftest import write_bundle


def test_scan_indexes_good_bundles_and_skips_bad_ones(tmp_path, intermediate, caplog):
    write_bundle(tmp_path, "t.good.test", intermediate)
    bad = tmp_path / "t.bad.test"
    bad.mkdir()
    (bad / "fullchain.pem").write_text("not a certificate")
    (bad / "privkey.pem").write_text("not a key")
    (tmp_path / "Not_A_Domain").mkdir()
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    assert sorted(store.index) == ["t.good.test"]
    assert store.context_for("t.good.test") is not None
    assert store.context_for("t.bad.test") is None
    assert "t.bad.test" in caplog.text


def test_a_bad_rewrite_keeps_the_last_good_bundle(tmp_path, intermediate):
    write_bundle(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    good = store.context_for("t.good.test")
    (tmp_path / "t.good.test" / "privkey.pem").write_text("truncated")
    store.scan()
    assert store.context_for("t.good.test") is good


def test_removed_domain_leaves_the_index(tmp_path, intermediate):
    write_bundle(tmp_path, "t.gone.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    for f in (tmp_path / "t.gone.test").iterdir():
        f.unlink()
    (tmp_path / "t.gone.test").rmdir()
    store.scan()
    assert store.context_for("t.gone.test") is None


def test_cache_is_bounded_and_rebuilds_on_demand(tmp_path, intermediate):
    for i in range(5):
        write_bundle(tmp_path, f"t.d{i}.test", intermediate)
    store = CertStore(tmp_path, cache_size=2)
    store.scan()
    assert len(store._cache) == 2
    assert store.context_for("t.d0.test") is not None  # evicted, rebuilt
    assert len(store._cache) == 2


def test_sni_callback_refuses_unknown_and_missing_names(tmp_path, intermediate):
    write_bundle(tmp_path, "t.good.test", intermediate)
    store = CertStore(tmp_path, cache_size=10)
    store.scan()
    counts: dict[str, int] = {}
    tally = HandshakeTally(lambda r: counts.__setitem__(r, counts.get(r, 0) + 1))
    base = new_server_context()
    install_sni_callback(base, store.context_for, tally)
    cb = base.sni_callback
    assert cb is not None
    sslobj = base.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert cb(sslobj, None, base) == ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    assert cb(sslobj, "t.other.test", base) == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    assert cb(sslobj, "T.Good.Test.", base) is None
    assert sslobj.context is store.context_for("t.good.test")
    assert counts == {"no_sni": 1, "unknown_sni": 1}
    tally.failed()  # claims one refusal, so it's no error
    tally.failed()
    tally.failed()
    assert counts == {"no_sni": 1, "unknown_sni": 1, "error": 1}


def test_domain_names():
    assert is_domain_name("t.example.com") and is_domain_name("t.xn--bcher-kva.test")
    for bad in ("localhost", "*.example.com", "T.example.com", "a..b", "../x", "1.2.3.4x.-a"):
        assert not is_domain_name(bad), bad
