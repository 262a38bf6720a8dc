"""`edgeproxy cert check`: the registration verdict for one bundle, offline.

Prints every violation (or OK with expiry and fingerprints); never prints key material.
Exit code 0 only when the bundle would be accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

from edgeproxy.errors import ConfigError
from edgeproxy.tls.bundle import BundleBytes, Verdict, spki_sha256, trust_store, validate_bundle
from edgeproxy.tls.source import FULLCHAIN
from edgeproxy.tls.store import is_domain_name


def registered_keys(certs_dir: Path) -> dict[str, str]:
    """Public-key fingerprints of every domain in a certificates folder (from their leaves)."""
    out: dict[str, str] = {}
    for folder in sorted(certs_dir.iterdir()) if certs_dir.is_dir() else []:
        if not is_domain_name(folder.name):
            continue
        try:
            leaf = x509.load_pem_x509_certificate((folder / FULLCHAIN).read_bytes())
        except (OSError, ValueError):
            continue
        out[folder.name] = spki_sha256(leaf)
    return out


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def check_files(
    domain: str,
    fullchain: Path,
    key: Path,
    *,
    trust_bundle: Path | None,
    certs_dir: Path | None,
    as_json: bool,
) -> int:
    bundle = BundleBytes(domain, _read(fullchain, "certificate chain"), _read(key, "key"))
    users: dict[str, set[str]] = {}
    for other, fp in (registered_keys(certs_dir) if certs_dir is not None else {}).items():
        users.setdefault(fp, set()).add(other)
    verdict = validate_bundle(bundle, roots=trust_store(trust_bundle), key_users=users)
    text = _render(verdict, fullchain, key)
    if as_json:
        print(json.dumps(_doc(verdict), indent=2))
    else:
        print(text)
    return 0 if verdict.ok else 1


def _doc(v: Verdict) -> dict[str, object]:
    return {
        "domain": v.domain,
        "ok": v.ok,
        "errors": [str(e) for e in v.errors],
        "warnings": list(v.warnings),
        "not_after": v.not_after.isoformat() if v.not_after else None,
        "days_left": round(v.days_left() or 0, 1) if v.not_after else None,
        "certificate_sha256": v.cert_sha256,
        "public_key_sha256": v.spki_sha256,
    }


def _render(v: Verdict, fullchain: Path, key: Path) -> str:
    def named(message: str) -> str:
        return (
            message.replace("fullchain.pem", str(fullchain), 1)
            if "fullchain.pem:" in message
            else message.replace("privkey.pem", str(key), 1)
        )

    lines = []
    if v.ok:
        lines.append(
            f"OK {v.domain}: expires {v.not_after:%Y-%m-%d} ({int(v.days_left() or 0)} days left)"
        )
        lines.append(f"  certificate sha256 {v.cert_sha256}")
        lines.append(f"  public key sha256  {v.spki_sha256}")
    else:
        n = len(v.errors)
        lines.append(f"INVALID {v.domain}: {n} problem{'s' if n != 1 else ''}")
        for e in v.errors:
            lines.append(f"  - {named(str(e))}" + (f"\n    fix: {e.hint}" if e.hint else ""))
    for w in v.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
