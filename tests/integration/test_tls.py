"""TLS by SNI against a running edge: the right certificate per host, nothing for others."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
from cryptography import x509

from tests.conftest import DOMAINS
from tests.support.client import Conn
from tests.support.edge import Edge


def _fingerprint_on_disk(certs_dir, domain: str) -> str:
    pem = (certs_dir / domain / "fullchain.pem").read_bytes()
    leaf = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(leaf.public_bytes(ssl_der())).hexdigest()


def ssl_der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


@pytest.mark.parametrize("domain", DOMAINS)
async def test_each_sni_gets_its_own_certificate(edge: Edge, client_ctx, certs_dir, domain):
    """The served leaf is the one on disk for that SNI name (IDN included)."""
    conn = await Conn.open(edge.port, domain, client_ctx)
    try:
        served = hashlib.sha256(conn.peer_cert()).hexdigest()
    finally:
        await conn.close()
    assert served == _fingerprint_on_disk(certs_dir, domain)


async def test_unknown_sni_is_refused(edge: Edge, client_ctx):
    """An unregistered name gets an alert, not somebody else's certificate."""
    before = edge.settled_sample("edgeproxy_tls_handshakes_total", result="unknown_sni")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # accept anything: proves no certificate is sent at all
    # uvloop closes the socket without flushing the alert, so the client sees EOF or reset.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await Conn.open(edge.port, "t.unknown.test", ctx)
    # Counted in the worker, handed to /metrics a few times a second.
    assert edge.wait_sample("edgeproxy_tls_handshakes_total", before + 1, result="unknown_sni") == (
        before + 1
    )


async def test_missing_sni_is_refused(edge: Edge):
    """A client that sends no SNI (a scanner on the bare IP) gets no certificate."""
    before = edge.settled_sample("edgeproxy_tls_handshakes_total", result="no_sni")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", edge.port, ssl=ctx, server_hostname=None)
    assert edge.wait_sample("edgeproxy_tls_handshakes_total", before + 1, result="no_sni") == (
        before + 1
    )


def _s_client(port: int, *args: str) -> str:
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            DOMAINS[0],
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            *args,
        ],
        input=b"",
        capture_output=True,
        timeout=10,
    )
    return (proc.stdout + proc.stderr).decode(errors="replace")


def test_tls_1_1_is_refused(edge: Edge):
    """TLS 1.2 is the minimum: openssl offering only TLS 1.1 gets no certificate."""
    assert "Protocol  : TLSv1.2" in _s_client(edge.port, "-tls1_2")  # the tool works
    assert "no peer certificate available" in _s_client(edge.port, "-tls1_1")


async def test_tls12_and_alpn_http11(edge: Edge, ca):
    """A TLS 1.2-only client works, and ALPN settles on http/1.1."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    conn = await Conn.open(edge.port, DOMAINS[0], ctx)
    try:
        obj = conn.writer.get_extra_info("ssl_object")
        assert (obj.version(), obj.selected_alpn_protocol()) == ("TLSv1.2", "http/1.1")
    finally:
        await conn.close()


def test_stalled_handshake_is_cut(edge: Edge):
    """A client that connects and never says hello is closed after handshake_timeout (2 s)."""
    with socket.create_connection(("127.0.0.1", edge.port)) as s:
        s.settimeout(10)
        start = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - start < 5


def test_each_stalled_handshake_gets_its_own_deadline(edge: Edge, client_ctx):
    """One timer serves all handshakes (tls/transport.HandshakeDeadlines): a client that
    stalls later is cut 2 s after its own connect, not at the first one's deadline, and a
    completed handshake in between is not cut at all."""
    closed_after: dict[str, float] = {}

    def silent(name: str) -> None:
        with socket.create_connection(("127.0.0.1", edge.port)) as s:
            s.settimeout(10)
            start = time.monotonic()
            assert s.recv(1) == b""
            closed_after[name] = time.monotonic() - start

    first = threading.Thread(target=silent, args=("first",))
    first.start()
    time.sleep(1.0)
    done = socket.create_connection(("127.0.0.1", edge.port))
    tls = client_ctx.wrap_socket(done, server_hostname=DOMAINS[0])  # the handshake completes
    second = threading.Thread(target=silent, args=("second",))
    second.start()
    try:
        first.join(10)
        assert 1.5 < closed_after["first"] < 3.5
        # (checked now: from here header_timeout, 2 s, would close it for its lack of request)
        tls.settimeout(0.2)
        with pytest.raises(TimeoutError):  # still open: nothing to read, no EOF
            tls.recv(1)
        second.join(10)
        assert 1.5 < closed_after["second"] < 3.5  # cut at the first's deadline, it'd be ~1 s
    finally:
        tls.close()


def test_garbage_handshake_counts_as_error(edge: Edge):
    """Bytes that are not TLS fail the handshake and are counted as result=error."""
    before = edge.settled_sample("edgeproxy_tls_handshakes_total", result="error")
    with socket.create_connection(("127.0.0.1", edge.port)) as s:
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(1024):
                pass
        except ConnectionError:
            pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if edge.sample("edgeproxy_tls_handshakes_total", result="error") >= before + 1:
            break
        time.sleep(0.05)
    assert edge.sample("edgeproxy_tls_handshakes_total", result="error") == before + 1


# --- the TLS transport (edgeproxy/tls/transport.py) ------------------------------------------


def test_a_refused_upload_still_gets_its_answer(edge: Edge, client_ctx):
    """The edge answers 413 and closes while the body is still arriving. Closed with those
    bytes unread, the kernel would send a reset, and a client that hasn't read the 413 yet
    loses it: the edge half-closes and reads on (lingers) instead."""
    head = b"POST /track HTTP/1.1\r\nHost: %s\r\nContent-Length: 70000\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", edge.port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname=DOMAINS[0]) as tls,
    ):
        tls.settimeout(5)
        tls.sendall(head % DOMAINS[0].encode() + b"x" * 60000)
        time.sleep(0.5)  # the 413 arrives and waits, unread, in this socket
        tls.sendall(b"x" * 5000)  # more of the body, after the edge's close
        got = b""
        while chunk := tls.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 413 "), got[:100]


async def test_a_slow_reader_gets_a_large_response_whole(edge: Edge, client_ctx):
    """1 MiB to a client that reads nothing for a while: the edge keeps what the socket
    doesn't take (and pauses the upstream), then sends all of it, in order."""
    conn = await Conn.open(edge.port, DOMAINS[0], client_ctx)
    conn.send(b"GET /track/bigbody HTTP/1.1\r\nHost: %s\r\n\r\n" % DOMAINS[0].encode())
    await asyncio.sleep(1.0)
    [resp] = await conn.read_responses()
    await conn.close()
    assert resp.status == 200 and resp.body == b"b" * 1048576


def test_the_worker_says_which_connections_serve(edge: Edge):
    """Client connections are C (tls/native.py) wherever that is built and fits, and the
    worker's ready line says which serve; a build CI requires must serve with C."""
    from edgeproxy.tls import native

    ready = [
        json.loads(line)
        for line in edge.stderr().splitlines()
        if line.startswith("{") and '"worker ready"' in line
    ]
    assert ready, edge.stderr()
    served = ready[0]["connections"]
    if native.unavailable():
        assert served == f"Python ({native.unavailable()})"
    else:
        assert served == "C"
    forced = os.environ.get("EDGEPROXY_PY_TRANSPORT") == "1"
    if os.environ.get("EDGEPROXY_REQUIRE_COMPILED") == "1" and not forced:
        assert served == "C", native.unavailable()
