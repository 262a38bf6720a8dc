"""Typed, frozen, validated settings: a bad config cannot exist past `load_settings`.

Rules:
- Every key of the TOML file maps to one field; an unknown key is an error (typos surface at
  start, not as a silently ignored setting).
- `EDGEPROXY_<SECTION>_<KEY>` environment variables override single keys; the value is read
  as a TOML value (`2`, `"x"`, `["127.0.0.1:8443"]`), or as a plain string when it isn't one.
- Relative paths are relative to the working directory the edge is started from.
- Durations are float seconds; sizes say their unit in the name.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from edgeproxy.errors import ConfigError

TRACKER_ROUTES = ("/track", "/chat", "/collection", "/general")
"""The paths the tag talks to (seed: track_url, chat_url, collection_url, general_url)."""

LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object, key: str) -> Address:
    """Parse `host:port` or `[v6]:port`; port 0 asks the kernel for a free one."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{key}: expected "host:port", got {value!r}')
    if value.startswith("["):
        host, sep, port_s = value[1:].partition("]:")
    else:
        host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(
            f"{key}: {value!r} is not host:port",
            hint='write e.g. "0.0.0.0:443" or "[::]:443"',
        )
    return Address(host, int(port_s))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[Address, ...] = (Address("0.0.0.0", 443),)
    workers: int = 1
    """Processes serving the same port; 0 means one per CPU core."""
    handshake_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    """How long an idle client connection is kept open between requests."""
    header_timeout: float = 10.0
    """Time allowed from a request's first byte to the end of its headers (slowloris bound)."""
    send_timeout: float = 60.0
    """A client that takes none of what waits to be sent to it for this long is cut off."""
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 1048576
    drain_timeout: float = 10.0
    """On SIGTERM, how long in-flight requests may take before the worker exits anyway."""
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Peers whose X-Forwarded-For / Forwarded are believed (CIDRs)."""
    backlog: int = 1024
    proxy_protocol: bool = False
    """Expect a PROXY v1/v2 header (from trusted_proxies only) before TLS."""

    def __post_init__(self) -> None:
        if self.proxy_protocol and not self.trusted_proxies:
            raise ConfigError(
                "server.proxy_protocol: needs server.trusted_proxies (the load balancers)"
            )
        if not self.listen:
            raise ConfigError("server.listen: at least one address is needed")
        if self.workers < 0 or self.workers > 256:
            raise ConfigError(f"server.workers: {self.workers} is not between 0 and 256")
        _positive(
            "server",
            self,
            "handshake_timeout",
            "keepalive_timeout",
            "header_timeout",
            "send_timeout",
            "drain_timeout",
            "max_header_bytes",
            "max_headers",
            "max_body_bytes",
            "backlog",
        )

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class CertsSettings:
    dir: Path = Path("certs")
    trust_bundle: Path | None = None
    cache_size: int = 5000
    """How many per-domain SSL contexts a worker keeps built (LRU; ~25 KB each)."""
    state_dir: Path | None = None
    """The edge's own state (validated bundles it serves, index); default <dir>/.edgeproxy."""
    rescan_interval: float = 60.0
    """Full rescans catch anything the file watcher missed."""
    reload_step_ms: int = 10
    """Quiet time after the last file event before a change is picked up."""
    reload_debounce_ms: int = 200
    """Longest a burst of file events is grouped before it is picked up anyway."""
    force_polling: bool = False
    """Poll the folder instead of inotify (network filesystems, exotic mounts)."""

    def __post_init__(self) -> None:
        _positive(
            "certs", self, "cache_size", "rescan_interval", "reload_step_ms", "reload_debounce_ms"
        )

    @property
    def state(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.dir / ".edgeproxy"


@dataclass(frozen=True, slots=True)
class NotifySettings:
    webhook_url: str = ""
    """Expiry reminders are POSTed here as JSON ("" = log only)."""
    reminder_days: tuple[int, ...] = (60, 30, 14, 7, 1)
    check_interval: float = 3600.0

    def __post_init__(self) -> None:
        if self.webhook_url and urlsplit(self.webhook_url).scheme not in ("http", "https"):
            raise ConfigError(f"notify.webhook_url: {self.webhook_url!r} is not an http(s) URL")
        if not self.reminder_days or any(d <= 0 for d in self.reminder_days):
            raise ConfigError("notify.reminder_days: list positive numbers of days, e.g. [60, 30]")
        _positive("notify", self, "check_interval")


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    upstreams: tuple[str, ...]
    long_lived: bool = False
    """Long-lived routes (chat) may upgrade to WebSocket and stream past response_timeout."""

    def __post_init__(self) -> None:
        key = f'routes."{self.prefix}"'
        if not any(self.prefix == r or self.prefix.startswith(r + "/") for r in TRACKER_ROUTES):
            raise ConfigError(
                f"{key}: only the tracker routes {', '.join(TRACKER_ROUTES)} (or paths under "
                "them) can be forwarded",
                hint="the edge answers 404 for everything else by design",
            )
        if self.prefix.endswith("/") or "//" in self.prefix or "." in self.prefix.split("/"):
            raise ConfigError(f"{key}: write the prefix without a trailing slash or dot segments")
        if not self.upstreams:
            raise ConfigError(f"{key}: list at least one upstream URL")
        for url in self.upstreams:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{key}: {url!r} is not an http:// or https:// URL")
            if parts.query or parts.fragment:
                raise ConfigError(f"{key}: {url!r} must not have a query or fragment")
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError as exc:
                raise ConfigError(f"{key}: {url!r} has an invalid port") from exc


@dataclass(frozen=True, slots=True)
class ProxySettings:
    long_lived_routes: tuple[str, ...] = ("/chat",)
    connect_timeout: float = 2.0
    response_timeout: float = 10.0
    """Beacon routes: time from sending the request to the end of the upstream's response."""
    long_lived_idle_timeout: float = 300.0
    """Long-lived routes: the longest silence in either direction before the edge gives up."""
    upstream_keepalive_timeout: float = 30.0
    """Idle pooled upstream connections are closed after this long."""
    upstream_max_idle: int = 64
    """Idle connections kept per upstream URL."""

    def __post_init__(self) -> None:
        _positive(
            "proxy",
            self,
            "connect_timeout",
            "response_timeout",
            "long_lived_idle_timeout",
            "upstream_keepalive_timeout",
            "upstream_max_idle",
        )


_COOKIE_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """First-party behaviour for one customer host (or the default for all)."""

    visitor_cookie: str = "_ep_vid"
    legacy_cookies: tuple[str, ...] = ()
    """Cookie names of a visitor id the tag already had: carried over as the edge's id."""
    opt_out_cookie: str = "_ep_optout"
    upstream_cookies: tuple[str, ...] = ()
    """Cookie names the upstream knows; only these and the edge's own are forwarded."""
    allowed_origins: tuple[str, ...] = ()
    """Exact origins allowed besides https on the registrable domain and its subdomains."""
    cookie_max_age_days: int = 400
    registrable_domain: str = ""
    """Overrides the Public Suffix List (rarely needed)."""

    def __post_init__(self) -> None:
        for name in (
            self.visitor_cookie,
            self.opt_out_cookie,
            *self.legacy_cookies,
            *self.upstream_cookies,
        ):
            if not _COOKIE_NAME.match(name):
                raise ConfigError(f"policy: {name!r} is not a valid cookie name")
        if not 1 <= self.cookie_max_age_days <= 400:
            raise ConfigError(
                "policy.cookie_max_age_days: between 1 and 400 (browsers cap "
                "cookie lifetimes at 400 days)"
            )
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("https", "http") or not parts.hostname or parts.path:
                raise ConfigError(
                    f"policy.allowed_origins: {origin!r} is not an origin "
                    "(scheme://host[:port], no path)"
                )


@dataclass(frozen=True, slots=True)
class PolicySettings:
    default: DomainPolicy = field(default_factory=DomainPolicy)
    domains: Mapping[str, DomainPolicy] = field(default_factory=dict)
    anonymize_ip: bool = False
    """Truncate client addresses to /24 (IPv4) or /48 (IPv6) before forwarding."""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: Address | None = Address("127.0.0.1", 9100)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address | None = Address("127.0.0.1", 9200)
    token_file: Path = Path("conf/admin.token")
    """Bearer token for the admin API; created (mode 0600) when missing."""
    allow_public: bool = False
    """The admin API refuses a non-loopback address unless this is set."""
    max_body_bytes: int = 262144

    def __post_init__(self) -> None:
        _positive("admin", self, "max_body_bytes")
        if self.listen is not None and not self.allow_public and not _is_loopback(self.listen):
            raise ConfigError(
                f"admin.listen: {self.listen} is not a loopback address",
                hint="the admin API changes certificates; set admin.allow_public = true "
                "only behind a firewall or a proxy that adds TLS",
            )


@dataclass(frozen=True, slots=True)
class DnsSettings:
    cname_target: str = ""
    """The host customers alias to (e.g. cname.vendor.example); the doctor checks for it."""
    resolver: str = ""
    """host:port of the DNS server the doctor asks ("" = the system's resolvers)."""
    timeout: float = 3.0

    def __post_init__(self) -> None:
        if self.resolver:
            parse_address(self.resolver, "dns.resolver")
        _positive("dns", self, "timeout")


def _is_loopback(address: Address) -> bool:
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: LogLevel = "info"
    access: bool = True
    """JSON access log lines on stdout (logger edgeproxy.access)."""

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level: {self.level!r} is not debug, info, warning or error")


def _default_routes() -> tuple[Route, ...]:
    return tuple(
        Route(p, ("http://127.0.0.1:8081",), long_lived=p == "/chat") for p in TRACKER_ROUTES
    )


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    certs: CertsSettings = field(default_factory=CertsSettings)
    routes: tuple[Route, ...] = field(default_factory=_default_routes)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)

    def __post_init__(self) -> None:
        prefixes = [r.prefix for r in self.routes]
        if len(set(prefixes)) != len(prefixes):
            raise ConfigError("routes: a prefix is listed twice")
        for p in self.proxy.long_lived_routes:
            if p not in prefixes:
                raise ConfigError(f"proxy.long_lived_routes: {p!r} is not a key of [routes]")


def _positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}: must be greater than 0, got {value!r}")


# --- loading -------------------------------------------------------------------------------

_SECTIONS = (
    "server",
    "certs",
    "routes",
    "proxy",
    "metrics",
    "admin",
    "log",
    "notify",
    "dns",
    "policy",
)


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read a TOML file (or nothing: all defaults) plus EDGEPROXY_* overrides.

    Raises:
        ConfigError: the file is missing or unreadable, or any key is unknown or invalid.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _apply_env(raw, os.environ if env is None else env)
    return settings_from_dict(raw)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith("EDGEPROXY_") or name.count("_") < 2:
            continue
        section, _, key = name[len("EDGEPROXY_") :].lower().partition("_")
        if section not in _SECTIONS or section == "routes":
            continue
        try:
            parsed: object = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        raw.setdefault(section, {})[key] = parsed


def settings_from_dict(raw: Mapping[str, Any]) -> Settings:
    """Build Settings from a parsed TOML document; every error names its key."""
    for section in raw:
        if section not in _SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_SECTIONS)})")
    s = _Section(raw, "server")
    server = ServerSettings(
        listen=tuple(
            parse_address(a, "server.listen") for a in s.strings("listen", ["0.0.0.0:443"])
        ),
        workers=s.integer("workers", 1),
        handshake_timeout=s.number("handshake_timeout", 10.0),
        keepalive_timeout=s.number("keepalive_timeout", 75.0),
        header_timeout=s.number("header_timeout", 10.0),
        send_timeout=s.number("send_timeout", 60.0),
        max_header_bytes=s.integer("max_header_bytes", 16384),
        max_headers=s.integer("max_headers", 100),
        max_body_bytes=s.integer("max_body_bytes", 1048576),
        drain_timeout=s.number("drain_timeout", 10.0),
        trusted_proxies=tuple(
            _network(v, "server.trusted_proxies") for v in s.strings("trusted_proxies", [])
        ),
        backlog=s.integer("backlog", 1024),
        proxy_protocol=s.flag("proxy_protocol", False),
    )
    s.done()
    c = _Section(raw, "certs")
    trust = c.text("trust_bundle", "")
    state_dir = c.text("state_dir", "")
    certs = CertsSettings(
        dir=Path(c.text("dir", "certs")),
        trust_bundle=Path(trust) if trust else None,
        cache_size=c.integer("cache_size", 5000),
        state_dir=Path(state_dir) if state_dir else None,
        rescan_interval=c.number("rescan_interval", 60.0),
        reload_step_ms=c.integer("reload_step_ms", 10),
        reload_debounce_ms=c.integer("reload_debounce_ms", 200),
        force_polling=c.flag("force_polling", False),
    )
    c.done()
    n = _Section(raw, "notify")
    days = n._get("reminder_days", [60, 30, 14, 7, 1])
    if not isinstance(days, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in days
    ):
        raise ConfigError(f"notify.reminder_days: expected a list of whole days, got {days!r}")
    notify = NotifySettings(
        webhook_url=n.text("webhook_url", ""),
        reminder_days=tuple(sorted(set(days), reverse=True)),
        check_interval=n.number("check_interval", 3600.0),
    )
    n.done()
    p = _Section(raw, "proxy")
    proxy = ProxySettings(
        long_lived_routes=tuple(p.strings("long_lived_routes", ["/chat"])),
        connect_timeout=p.number("connect_timeout", 2.0),
        response_timeout=p.number("response_timeout", 10.0),
        long_lived_idle_timeout=p.number("long_lived_idle_timeout", 300.0),
        upstream_keepalive_timeout=p.number("upstream_keepalive_timeout", 30.0),
        upstream_max_idle=p.integer("upstream_max_idle", 64),
    )
    p.done()
    routes_raw = raw.get("routes")
    if routes_raw is None:
        routes = tuple(
            Route(r.prefix, r.upstreams, long_lived=r.prefix in proxy.long_lived_routes)
            for r in _default_routes()
        )
    else:
        if not isinstance(routes_raw, dict) or not routes_raw:
            raise ConfigError('routes: expected a table of "/prefix" = ["http://..."]')
        routes = tuple(
            Route(
                str(prefix),
                tuple(_str_list(urls, f'routes."{prefix}"')),
                long_lived=prefix in proxy.long_lived_routes,
            )
            for prefix, urls in routes_raw.items()
        )
    m = _Section(raw, "metrics")
    metrics_listen = m.text("listen", "127.0.0.1:9100")
    metrics = MetricsSettings(
        listen=parse_address(metrics_listen, "metrics.listen") if metrics_listen else None
    )
    m.done()
    a = _Section(raw, "admin")
    admin_listen = a.text("listen", "127.0.0.1:9200")
    admin = AdminSettings(
        listen=parse_address(admin_listen, "admin.listen") if admin_listen else None,
        token_file=Path(a.text("token_file", "conf/admin.token")),
        allow_public=a.flag("allow_public", False),
        max_body_bytes=a.integer("max_body_bytes", 262144),
    )
    a.done()
    d = _Section(raw, "dns")
    dns = DnsSettings(
        cname_target=d.text("cname_target", "").rstrip(".").lower(),
        resolver=d.text("resolver", ""),
        timeout=d.number("timeout", 3.0),
    )
    d.done()
    lg = _Section(raw, "log")
    log = LogSettings(level=lg.text("level", "info"), access=lg.flag("access", True))  # type: ignore[arg-type]
    lg.done()
    return Settings(
        server=server,
        certs=certs,
        routes=routes,
        proxy=proxy,
        metrics=metrics,
        admin=admin,
        log=log,
        notify=notify,
        dns=dns,
        policy=_policy(raw.get("policy", {})),
    )


def _domain_policy(table: Mapping[str, Any], key: str, base: DomainPolicy) -> DomainPolicy:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table")
    known = {f for f in DomainPolicy.__dataclass_fields__}
    for k in table:
        if k not in known:
            raise ConfigError(f"{key}.{k}: unknown key", hint=f"known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for k, v in table.items():
        default = getattr(base, k)
        if isinstance(default, tuple):
            values[k] = tuple(_str_list(v, f"{key}.{k}"))
        elif isinstance(default, int) and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{key}.{k}: expected an integer, got {v!r}")
        elif isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"{key}.{k}: expected a string, got {v!r}")
        else:
            values[k] = v
    return replace(base, **values)


def _policy(raw: object) -> PolicySettings:
    if not isinstance(raw, dict):
        raise ConfigError("policy: expected a table [policy]")
    table = dict(raw)
    domains_raw = table.pop("domains", {})
    anonymize = table.pop("anonymize_ip", False)
    if not isinstance(anonymize, bool):
        raise ConfigError(f"policy.anonymize_ip: expected true or false, got {anonymize!r}")
    default = _domain_policy(table, "policy", DomainPolicy())
    if not isinstance(domains_raw, dict):
        raise ConfigError('policy.domains: expected tables [policy.domains."t.example.com"]')
    domains = {
        str(d): _domain_policy(t, f'policy.domains."{d}"', default) for d, t in domains_raw.items()
    }
    return PolicySettings(default, MappingProxyType(domains), anonymize)


def _network(value: object, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not an IP address or CIDR") from exc


def _str_list(value: object, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return value


class _Section:
    """Typed reads from one TOML table, remembering which keys were used."""

    def __init__(self, raw: Mapping[str, Any], name: str) -> None:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table [{name}]")
        self.name, self.table, self.used = name, table, set[str]()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def _bad(self, key: str, want: str, value: object) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: expected {want}, got {value!r}")

    def integer(self, key: str, default: int) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer", v)
        return v

    def number(self, key: str, default: float) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._bad(key, "a number of seconds", v)
        return float(v)

    def text(self, key: str, default: str) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def strings(self, key: str, default: list[Any]) -> list[str]:
        return _str_list(self._get(key, default), f"{self.name}.{key}")

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.name}.{unknown[0]}: unknown key",
                hint=f"known keys in [{self.name}]: {', '.join(sorted(self.used))}",
            )
