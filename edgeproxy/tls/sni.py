"""TLS policy and the SNI callback: each handshake gets the registered domain's context.

Rules:
- An unknown SNI name, or none, gets the handshake refused with an alert: there is no
  default certificate, so a scanner never sees any customer's certificate.
- The callback only looks a name up in the store and assigns a context; it does no disk I/O
  except building a context on a domain's first handshake after it fell out of the cache.
- The base context is made once in the supervisor before the workers fork, so its TLS 1.3
  session-ticket keys are shared and a resumed session is accepted by any worker. OpenSSL
  takes ticket keys from the context the connection started on, not the one SNI switched to.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from edgeproxy.logging import tls_log

# Mozilla "intermediate" TLS 1.2 suites (ECDHE only: no DH parameters to manage). TLS 1.3
# suites are OpenSSL's defaults, which are the same list.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def apply_tls_policy(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 minimum, intermediate ciphers, ALPN http/1.1, no compression/renegotiation."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    return ctx


class DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write, pending and do_handshake are the C object's own.

    For memory-BIO users of the server context (uvloop's TLS: bench/relay.py; the edge's
    own connections use tls/transport.py): uvloop calls these for every TLS record, and
    ssl.py's methods only pass the same arguments on to `self._sslobj`, a Python frame each.
    Everything else (the SNI callback's view, properties) is SSLObject's.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> Any:  # (private in ssl.py: untyped)
        self = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = self._sslobj
        self.read, self.write = c.read, c.write
        self.pending, self.do_handshake = c.pending, c.do_handshake
        return self


def new_server_context() -> ssl.SSLContext:
    ctx = apply_tls_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.sslobject_class = DirectSSLObject
    return ctx


class HandshakeTally:
    """Counts handshake results: `ok` and `failed` from the transport (tls/transport.py),
    `refused` from the SNI callback.

    A handshake the SNI callback refused also fails in the transport; `refused` counts it
    under its reason and leaves a claim that the next failure consumes, so that it isn't
    counted as an `error` too.

    Counts are plain integers that `flush` hands to the metrics a few times a second: a
    multiprocess counter write per handshake (a getpid(2) and a lock) cost ~2% of one.
    """

    RESULTS = ("ok", "unknown_sni", "no_sni", "error")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.RESULTS, 0)
        self._unclaimed_refusals = 0
        # The C connections (tls/native.py) count their own results: (ok, failed) since
        # the last call, taken at each flush.
        self.source: Callable[[], tuple[int, int]] | None = None

    def ok(self) -> None:
        self.counts["ok"] += 1

    def refused(self, result: str) -> None:
        self._unclaimed_refusals += 1
        self.counts[result] += 1

    def failed(self) -> None:
        if self._unclaimed_refusals:
            self._unclaimed_refusals -= 1
        else:
            self.counts["error"] += 1

    def flush(self, add: Callable[[str, int], None]) -> None:
        if self.source is not None:
            ok, failed = self.source()
            self.counts["ok"] += ok
            claimed = min(failed, self._unclaimed_refusals)
            self._unclaimed_refusals -= claimed
            self.counts["error"] += failed - claimed
        for result, n in self.counts.items():
            if n:
                add(result, n)
                self.counts[result] = 0


SNI_ATTR = "edge_sni"
"""Attribute the callback sets on the connection (its TLSTransport): the server side of
OpenSSL keeps no SNI name to read back."""


Selection = ssl.SSLContext | int
"""What a handshake gets by its SNI name: the domain's context, or the alert refusing it."""


def make_selector(
    lookup: Callable[[str], ssl.SSLContext | None], tally: HandshakeTally
) -> Callable[[str | None], Selection]:
    """`select(name)`: the context for an SNI name already lowercased and without trailing
    dots (None: the client sent none), or the alert that refuses the handshake."""

    def select(name: str | None) -> Selection:
        if name is None:
            tally.refused("no_sni")
            return int(ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE)
        ctx = lookup(name)
        if ctx is None:
            tally.refused("unknown_sni")
            if tls_log.isEnabledFor(10):
                tls_log.debug("handshake refused: unknown SNI", extra={"sni": name[:253]})
            return int(ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
        return ctx

    return select


def install_sni_callback(
    base: ssl.SSLContext,
    lookup: Callable[[str], ssl.SSLContext | None],
    tally: HandshakeTally,
) -> None:
    """Make `base` pick each connection's context by SNI via `lookup(name)`, for
    connections that ssl's own objects serve (tls/transport.py, SSLObject on memory BIOs).
    The C connections (tls/native.py) install their own callback, with the same selector."""
    select = make_selector(lookup, tally)

    # `conn` is the connection's owner: a TLSTransport, or an SSLObject on memory BIOs.
    def on_sni(conn: Any, server_name: str | None, _: ssl.SSLContext) -> int | None:
        name = server_name.lower().rstrip(".") if server_name else None
        chosen = select(name)
        if isinstance(chosen, int):
            return chosen
        conn.context = chosen
        setattr(conn, SNI_ATTR, name)
        return None

    base.sni_callback = on_sni
