"""The admin API: the domain lifecycle over JSON, on its own loopback listener.

Rules:
- Every request but `GET /v1/openapi.json` needs `Authorization: Bearer <token>`, compared
  in constant time with the token file's content (re-read when the file changes).
- An upload is validated with the registration rules before anything touches the disk; a
  rejected upload (422, every violation listed) changes nothing.
- Responses and logs never contain key material; every change writes one audit line.

Statuses (see `status_of`): awaiting_certificate -> validating (the files on disk are newer
than what the registry has seen) -> preparing (validated and published, not yet served by
every worker) -> active / expiring / expired; invalid when the files on disk break a rule.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from edgeproxy.admin import storage
from edgeproxy.admin.openapi import OPENAPI
from edgeproxy.config import Settings
from edgeproxy.logging import admin_log
from edgeproxy.proxy.policy import is_public_suffix, registrable_domain
from edgeproxy.tls.bundle import BundleBytes, trust_store, validate_bundle
from edgeproxy.tls.registry import CertRegistry, CertState, Entry
from edgeproxy.tls.source import EMPTY
from edgeproxy.tls.store import is_domain_name

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SyncedAt = Callable[[], float]
Diagnose = Callable[[str], Awaitable[dict[str, Any]]]


class TokenFile:
    """The admin token, from a file, created when missing and re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = b""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            admin_log.warning("created the admin token file %s (mode 0600)", path)

    def token(self) -> bytes:
        st = os.stat(self.path)
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._token = self.path.read_bytes().strip()
            self._stamp = (st.st_mtime_ns, st.st_size)
        return self._token


def _bad_name(name: str) -> str | None:
    """Why `name` can't be registered, or None when it can."""
    if len(name) > 253:
        return "longer than 253 characters"
    if name != name.lower():
        return "must be lower case"
    if "*" in name:
        return "a wildcard can't be registered"
    if not is_domain_name(name):
        return "not a host name of at least two labels (IDNA A-labels, no IP address)"
    if registrable_domain(name) == name and is_public_suffix(name):
        return "a public suffix (like co.uk) is not a customer's host"
    for label in name.split("."):
        if label.startswith("xn--"):
            try:
                codecs.decode(label[4:].encode(), "punycode")
            except (UnicodeError, ValueError):
                return f"label {label!r} is not a valid IDNA A-label"
    return None


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts else None


def status_of(entry: Entry | None, disk_version: str | None, synced_at: float, now: float) -> str:
    """The lifecycle status of one domain (see the module docstring)."""
    if entry is None:
        return "awaiting_certificate" if disk_version in (None, EMPTY) else "validating"
    served = entry.served
    seen = {EMPTY, entry.rejected_version, served.version if served else None}
    if disk_version is not None and disk_version not in seen:
        return "validating"
    state = entry.state(now)
    if state in (CertState.INVALID, CertState.AWAITING):
        return str(state.value)
    assert served is not None
    if synced_at < served.validated_at:
        return "preparing"
    return str(state.value)


def status_doc(
    domain: str, entry: Entry | None, disk_version: str | None, synced_at: float, now: float
) -> dict[str, Any]:
    served = entry.served if entry else None
    return {
        "domain": domain,
        "status": status_of(entry, disk_version, synced_at, now),
        "not_after": _iso(served.not_after) if served else None,
        "days_left": round((served.not_after - now) / 86400, 1) if served else None,
        "certificate_sha256": served.cert_sha256 if served else None,
        "public_key_sha256": served.spki_sha256 if served else None,
        "errors": list(entry.errors) if entry else [],
        "warnings": list(served.warnings) if served else [],
        "validated_at": _iso(served.validated_at) if served else None,
        "updated_at": _iso(entry.updated_at) if entry else None,
    }


def build_admin_app(
    settings: Settings,
    registry: CertRegistry,
    synced_at: SyncedAt,
    diagnose: Diagnose | None = None,
) -> web.Application:
    certs_dir = settings.certs.dir
    tokens = TokenFile(settings.admin.token_file)
    source = registry.source

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/openapi.json":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not given or not hmac.compare_digest(given, tokens.token()):
            return _error(
                401,
                "unauthorized",
                "send Authorization: Bearer <admin token>",
                headers={"WWW-Authenticate": 'Bearer realm="edgeproxy"'},
            )
        return await handler(request)

    def doc(domain: str) -> dict[str, Any]:
        version = source.version(domain)
        return status_doc(domain, registry.entries.get(domain), version, synced_at(), time.time())

    def audit(request: web.Request, action: str, domain: str, result: str, **extra: Any) -> None:
        admin_log.info(
            "admin %s %s: %s",
            action,
            domain,
            result,
            extra={
                "audit": True,
                "action": action,
                "domain": domain,
                "result": result,
                "remote": request.remote,
                **extra,
            },
        )

    locks: dict[str, asyncio.Lock] = {}

    def lock(name: str) -> asyncio.Lock:
        """One change at a time per domain: an upload racing a delete (or another upload)
        must not resurrect the folder or mix one upload's key with the other's chain."""
        return locks.setdefault(name, asyncio.Lock())

    def registered(domain: str) -> bool:
        # Only a valid name ever touches the disk: `..` or `.edgeproxy` arrive here decoded.
        if _bad_name(domain) is not None:
            return False
        return domain in registry.entries or (certs_dir / domain).is_dir()

    async def list_domains(_: web.Request) -> web.Response:
        versions = await asyncio.to_thread(lambda: dict(source.versions()))
        now, synced = time.time(), synced_at()
        names = sorted(set(versions) | set(registry.entries))
        return web.json_response(
            {
                "domains": [
                    status_doc(d, registry.entries.get(d), versions.get(d), synced, now)
                    for d in names
                ]
            }
        )

    async def add_domain(request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("domain") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return _error(400, "bad_request", 'send JSON: {"domain": "t.example.com"}')
        why = _bad_name(name)
        if why is not None:
            return _error(422, "invalid_domain", f"{name[:300]!r}: {why}")
        async with lock(name):
            if registered(name) or not await asyncio.to_thread(
                storage.create_domain, certs_dir, name
            ):
                return _error(409, "exists", f"{name} is registered already")
            await asyncio.to_thread(registry.refresh, name)
        audit(request, "register", name, "created")
        return web.json_response(doc(name), status=201)

    def unknown(name: str) -> web.Response:
        return _error(404, "not_found", f"{name[:300]!r} is not registered")

    async def get_domain(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        if not registered(name):
            return unknown(name)
        return web.json_response(doc(name))

    async def upload(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        if not registered(name):
            return unknown(name)
        parts = await _read_bundle(request)
        if isinstance(parts, web.Response):
            return parts
        fullchain, privkey = parts
        async with lock(name):
            if not registered(name):  # removed while the body arrived
                return unknown(name)
            verdict = await asyncio.to_thread(
                validate_bundle,
                BundleBytes(name, fullchain, privkey),
                roots=trust_store(settings.certs.trust_bundle),
                key_users=registry.key_users,
            )
            if not verdict.ok:
                errors = [str(e) for e in verdict.errors]
                audit(request, "upload", name, "rejected", errors=errors)
                return web.json_response(
                    {
                        "domain": name,
                        "errors": errors,
                        "hints": [e.hint for e in verdict.errors if e.hint],
                    },
                    status=422,
                )
            written = await asyncio.to_thread(
                storage.write_bundle, certs_dir, name, fullchain, privkey
            )
            if not written:
                return unknown(name)
            await asyncio.to_thread(registry.refresh, name)
        audit(request, "upload", name, "accepted", cert_sha256=verdict.cert_sha256)
        return web.json_response(doc(name), status=202)

    async def remove(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        if not registered(name):
            return unknown(name)
        async with lock(name):
            await asyncio.to_thread(storage.remove_domain, certs_dir, name)
            await asyncio.to_thread(registry.refresh, name)
        audit(request, "remove", name, "removed")
        return web.Response(status=204)

    diagnoses = asyncio.Semaphore(4)

    async def check(request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        if not registered(name):
            return unknown(name)
        if diagnose is None:
            return _error(501, "not_implemented", "the doctor is not available")
        async with diagnoses:  # each diagnosis opens connections: bound how many run at once
            return web.json_response(await diagnose(name))

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    app = web.Application(middlewares=[auth], client_max_size=settings.admin.max_body_bytes)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/domains", list_domains)
    app.router.add_post("/v1/domains", add_domain)
    app.router.add_get("/v1/domains/{domain}", get_domain)
    app.router.add_delete("/v1/domains/{domain}", remove)
    app.router.add_put("/v1/domains/{domain}/certificate", upload)
    app.router.add_get("/v1/domains/{domain}/check", check)
    return app


_MALFORMED = (ValueError, RecursionError, LookupError, UnicodeError, TypeError)
"""What a hostile body can make JSON or multipart parsing raise (a 400, never a 500)."""


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except _MALFORMED:
        return None


async def _read_bundle(request: web.Request) -> tuple[bytes, bytes] | web.Response:
    """The uploaded PEMs, from JSON or multipart; a 400 response when neither fits.
    Bodies over admin.max_body_bytes are refused by aiohttp with 413."""
    hint = 'send JSON {"fullchain": PEM, "privkey": PEM} or multipart files fullchain, privkey'
    try:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            values = []
            for field in ("fullchain", "privkey"):
                item = form.get(field)
                if item is None:
                    return _error(400, "bad_request", f"missing part {field!r}; {hint}")
                values.append(item.file.read() if hasattr(item, "file") else str(item).encode())
            return values[0], values[1]
        body = await request.json()
        if not isinstance(body, dict) or not all(
            isinstance(body.get(k), str) for k in ("fullchain", "privkey")
        ):
            return _error(400, "bad_request", hint)
        return body["fullchain"].encode(), body["privkey"].encode()
    except _MALFORMED:
        return _error(400, "bad_request", hint)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)
