"""Every metric edgeproxy exports, built against one registry passed in.

Labels come only from fixed sets initialised at start-up: the configured route prefixes
(plus "none" for requests that matched no route), status classes, handshake results. The
customer domain is never a label on request or handshake metrics; it would multiply with
route x status as the customer count grows.

Several worker processes each hold their own values; prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before anything imports prometheus_client)
lets the control process sum them on scrape.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgeproxy import __version__

# Sub-millisecond (edge overhead on loopback) up to the response timeout.
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
HANDSHAKE_RESULTS = ("ok", "unknown_sni", "no_sni", "error")
UPSTREAM_ERRORS = ("connect", "timeout", "broken")
NO_ROUTE = "none"


class Metrics:
    """The metric objects of one process. Build a fresh one per test registry."""

    def __init__(self, registry: CollectorRegistry, routes: Iterable[str]) -> None:
        self.route_labels = (*routes, NO_ROUTE)
        self.request_duration = Histogram(
            "edgeproxy_request_duration_seconds",
            "Time from a request's headers to the end of the edge's response.",
            ["route", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "edgeproxy_upstream_duration_seconds",
            "Time from picking an upstream to the end of its response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "edgeproxy_upstream_errors_total",
            "Upstream exchanges that failed: connect (no connection), timeout, broken.",
            ["route", "kind"],
            registry=registry,
        )
        self.tls_handshakes = Counter(
            "edgeproxy_tls_handshakes_total",
            "TLS handshakes by result: ok, unknown_sni, no_sni, error (failed or timed out).",
            ["result"],
            registry=registry,
        )
        self.connections_active = Gauge(
            "edgeproxy_connections_active",
            "Client connections open after the handshake.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.workers_ready = Gauge(
            "edgeproxy_workers_ready",
            "Worker processes listening with certificates indexed.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.certificates_loaded = Gauge(
            "edgeproxy_certificates_loaded",
            "Domains with a usable certificate bundle.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "edgeproxy_build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        # Touch every label combination so series exist (at 0) from the first scrape.
        for route in self.route_labels:
            for status_class in STATUS_CLASSES:
                self.request_duration.labels(route, status_class)
            self.upstream_duration.labels(route)
            for kind in UPSTREAM_ERRORS:
                self.upstream_errors.labels(route, kind)
        for result in HANDSHAKE_RESULTS:
            self.tls_handshakes.labels(result)
