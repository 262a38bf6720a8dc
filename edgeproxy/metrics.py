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

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
CERT_STATES = ("active", "expiring", "expired", "invalid", "awaiting_certificate")
RELOAD_RESULTS = ("loaded", "rejected", "removed", "failed")

CertRow = tuple[str, float | None, str]
"""(domain, notAfter as a Unix timestamp or None, state)"""
CertMetricsSource = Callable[[], tuple[Iterable[CertRow], Mapping[str, int], float | None]]


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
            "Domains a worker can serve (the least up-to-date worker's count).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.served_synced = Gauge(
            "edgeproxy_served_synced_timestamp_seconds",
            "Everything the registry published before this time is served (least-synced worker).",
            registry=registry,
            multiprocess_mode="livemin",
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


class CertCollector(Collector):
    """Certificate metrics, read from the registry at scrape time (control process only).

    Kept out of the multiprocess files on purpose: one process owns them, and a removed
    domain's series must disappear, which multiprocess gauges can't do.
    """

    def __init__(self, source: CertMetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        rows, counts, last_success = self.source()
        not_after = GaugeMetricFamily(
            "edgeproxy_cert_not_after_timestamp_seconds",
            "When each domain's served certificate expires (the one per-domain series).",
            labels=["domain"],
        )
        states = dict.fromkeys(CERT_STATES, 0)
        earliest: float | None = None
        for domain, expiry, state in rows:
            states[state] = states.get(state, 0) + 1
            if expiry is not None:
                not_after.add_metric([domain], expiry)
                earliest = expiry if earliest is None else min(earliest, expiry)
        yield not_after
        by_state = GaugeMetricFamily(
            "edgeproxy_certs", "Registered domains by certificate state.", labels=["state"]
        )
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        reloads = CounterMetricFamily(
            "edgeproxy_cert_reloads", "Certificate bundle changes by result.", labels=["result"]
        )
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], counts.get(result, 0))
        yield reloads
        last = GaugeMetricFamily(
            "edgeproxy_cert_reload_last_success_timestamp_seconds",
            "When a certificate bundle was last loaded successfully.",
        )
        last.add_metric([], last_success or 0)
        yield last
        if earliest is not None:
            soonest = GaugeMetricFamily(
                "edgeproxy_certificate_earliest_expiry_timestamp_seconds",
                "The soonest notAfter among served certificates.",
            )
            soonest.add_metric([], earliest)
            yield soonest


class BatchedObserver:
    """A histogram child's observations gathered in plain Python and written in bulk.

    In multiprocess mode every write to a metric checks the pid (a getpid(2) syscall) and
    takes a lock: per request that was ~8% of a keep-alive beacon. `flush()` runs a few
    times a second (and when a worker stops), so a scrape lags by at most that much.
    """

    __slots__ = ("child", "bounds", "counts", "total", "dirty")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False

    def observe(self, amount: float) -> None:
        self.total += amount
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        child = self.child
        child._sum.inc(self.total)
        for i, n in enumerate(self.counts):
            if n:
                child._buckets[i].inc(n)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False
