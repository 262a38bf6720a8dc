"""The doctor: what is wrong with one customer host, before tracking stops.

Checks, each finding with a level (ok, info, warning, error) and a one-line fix:
- dns: does the host CNAME to `dns.cname_target`? An A/AAAA record instead, a wrong
  target, NXDOMAIN, or no answer are findings. Resolved with dnspython against
  `dns.resolver` (so tests and operators can point it at a given server).
- itp: a host reached through a third-party CNAME gets its cookies capped at 7 days by
  Safari's tracking prevention (WebKit's CNAME cloaking defense): visitor ids last a week.
- tls: a real handshake with that SNI against the edge's own listener: is the served
  certificate the registered one, and how many days are left?
- routes: an OPTIONS request through the edge to each tracker route answers (not 5xx).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from edgeproxy.config import Address, Settings
from edgeproxy.tls.registry import CertRegistry

EXPIRY_WARNING_DAYS = 60


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    level: str
    message: str
    fix: str | None = None


def _base(name: str) -> str:
    # The last two labels: a rough registrable domain (a public suffix list refines this).
    return ".".join(name.split(".")[-2:])


async def check_dns(settings: Settings, domain: str) -> list[Finding]:
    target = settings.dns.cname_target
    resolver = dns.asyncresolver.Resolver(configure=not settings.dns.resolver)
    if settings.dns.resolver:
        host, _, port = settings.dns.resolver.rpartition(":")
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    resolver.lifetime = settings.dns.timeout
    add = f"add `{domain}. CNAME {target or '<the edge target>'}.`"
    try:
        answer = await resolver.resolve(domain, "CNAME")
    except dns.resolver.NXDOMAIN:
        return [Finding("dns", "error", f"{domain} does not exist in DNS (NXDOMAIN)", add)]
    except dns.resolver.NoAnswer:
        return await _addresses_instead(resolver, domain, target)
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return [
            Finding(
                "dns",
                "error",
                f"DNS did not answer for {domain}: {exc}",
                "check the resolver, then the domain's name servers",
            )
        ]
    got = str(answer[0].target).rstrip(".").lower()
    out = []
    if not target:
        out.append(
            Finding(
                "dns",
                "info",
                f"{domain} is a CNAME for {got}",
                "set dns.cname_target so the doctor can check the target",
            )
        )
    elif got == target:
        out.append(Finding("dns", "ok", f"{domain} is a CNAME for {target}"))
    else:
        out.append(
            Finding(
                "dns",
                "error",
                f"{domain} is a CNAME for {got}, not {target}",
                f"change the record to `{domain}. CNAME {target}.`",
            )
        )
    if _base(got) != _base(domain):
        out.append(
            Finding(
                "itp",
                "info",
                f"{domain} reaches the edge through a third-party CNAME ({got}): Safari's "
                "tracking prevention caps cookies set by its responses at 7 days",
                "expect Safari visitor ids to last at most 7 days; only A/AAAA records to the "
                "customer's own addresses avoid the cap",
            )
        )
    return out


async def _addresses_instead(
    resolver: dns.asyncresolver.Resolver, domain: str, target: str
) -> list[Finding]:
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(domain, rdtype)
            found += [r.to_text() for r in answer]
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            break
    if found:
        return [
            Finding(
                "dns",
                "warning",
                f"{domain} has address records ({', '.join(found[:4])}), not a CNAME",
                f"replace them with `{domain}. CNAME {target or '<the edge target>'}.` so the "
                "edge can move without the customer changing DNS",
            )
        ]
    return [
        Finding(
            "dns",
            "error",
            f"{domain} has no CNAME, A or AAAA record",
            f"add `{domain}. CNAME {target or '<the edge target>'}.`",
        )
    ]


def _edge_address(settings: Settings) -> Address:
    a = settings.server.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(a.host, a.host)
    return Address(host, a.port)


async def check_tls(settings: Settings, domain: str, registered_sha: str | None) -> list[Finding]:
    edge = _edge_address(settings)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the fingerprint is compared instead
    try:
        async with asyncio.timeout(5):
            _, writer = await _connect(settings, domain, ctx)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return [
            Finding(
                "tls",
                "error",
                f"the edge at {edge} refused a handshake for {domain} ({exc})",
                "upload a valid certificate for the domain (status must be active)",
            )
        ]
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await _close(writer)
    served = hashlib.sha256(der).hexdigest()
    if registered_sha is not None and served != registered_sha:
        return [
            Finding(
                "tls",
                "error",
                f"the edge serves certificate {served[:16]}..., not the registered "
                f"{registered_sha[:16]}...",
                "wait a second and check again; if it persists, restart the edge and report it",
            )
        ]
    from cryptography import x509

    not_after = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    days = (not_after - time.time()) / 86400
    if days <= 0:
        return [
            Finding(
                "tls",
                "error",
                f"the certificate for {domain} has expired",
                "upload the renewed certificate now: tracking has stopped",
            )
        ]
    if days < EXPIRY_WARNING_DAYS:
        return [
            Finding(
                "tls",
                "warning",
                f"the certificate expires in {int(days)} days",
                "upload the renewed certificate before it expires",
            )
        ]
    return [
        Finding("tls", "ok", f"the edge serves the registered certificate ({int(days)} days left)")
    ]


async def _connect(
    settings: Settings, domain: str, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS to the edge's own listener with SNI `domain`, speaking PROXY first if it must."""
    edge = _edge_address(settings)
    if not settings.server.proxy_protocol:
        return await asyncio.open_connection(edge.host, edge.port, ssl=ctx, server_hostname=domain)
    reader, writer = await asyncio.open_connection(edge.host, edge.port)
    family = "TCP6" if ":" in edge.host else "TCP4"
    writer.write(f"PROXY {family} {edge.host} {edge.host} 0 {edge.port}\r\n".encode())
    await writer.drain()
    await writer.start_tls(ctx, server_hostname=domain)
    return reader, writer


async def _probe(settings: Settings, domain: str, route: str) -> Finding:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(settings.proxy.response_timeout + 2):
            reader, writer = await _connect(settings, domain, ctx)
            writer.write(
                f"OPTIONS {route} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = await reader.readline()
            await _close(writer)
        status = int(status_line.split()[1])
    except (OSError, ssl.SSLError, TimeoutError, ValueError, IndexError) as exc:
        return Finding(
            "routes",
            "error",
            f"{route}: no answer from the edge ({exc})",
            "fix the TLS finding first",
        )
    if status >= 500:
        return Finding(
            "routes",
            "error",
            f"{route} answered {status}",
            f"check the upstreams of {route} in [routes]",
        )
    return Finding("routes", "ok", f"{route} answered {status}")


async def check_routes(settings: Settings, domain: str) -> list[Finding]:
    """Every route at once: the whole check takes one response timeout, not one per route."""
    return list(
        await asyncio.gather(*(_probe(settings, domain, r.prefix) for r in settings.routes))
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(2):
            await writer.wait_closed()
    except (OSError, ssl.SSLError, TimeoutError):
        pass


async def diagnose(settings: Settings, registry: CertRegistry, domain: str) -> dict[str, Any]:
    entry = registry.entries.get(domain)
    registered = entry.served.cert_sha256 if entry and entry.served else None
    dns_findings, tls_findings = await asyncio.gather(
        check_dns(settings, domain), check_tls(settings, domain, registered)
    )
    findings = dns_findings + tls_findings
    if not any(f.level == "error" for f in tls_findings):
        findings += await check_routes(settings, domain)
    return {
        "domain": domain,
        "ok": not any(f.level == "error" for f in findings),
        "findings": [asdict(f) for f in findings],
    }
