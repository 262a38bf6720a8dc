"""Writes into the certificates folder for the admin API: atomic, private, all or nothing.

Rules:
- A domain folder is created mode 0700; key files are written mode 0600.
- Each file is written to a temp file in the same folder, fsynced, then renamed over the
  old one, so a reader sees the old file or the new one, never a mix of bytes.
- Nothing is written until the upload has passed validation (the caller's job), so a
  rejected upload changes nothing on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgeproxy.tls.registry import atomic_write
from edgeproxy.tls.source import FULLCHAIN, PRIVKEY
from edgeproxy.tls.store import is_domain_name


def create_domain(certs_dir: Path, domain: str) -> bool:
    """Register a domain: an empty folder. False when it exists already."""
    folder = _folder(certs_dir, domain)
    certs_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        return False
    return True


def _folder(certs_dir: Path, domain: str) -> Path:
    """The domain's folder, refusing anything that isn't a plain child of certs_dir."""
    if not is_domain_name(domain):
        raise ValueError(f"{domain!r} is not a registrable domain name")
    return certs_dir / domain


def write_bundle(certs_dir: Path, domain: str, fullchain: bytes, privkey: bytes) -> bool:
    """Write the two files into an existing domain folder. False when the folder is gone
    (removed meanwhile): an upload never brings a removed domain back."""
    folder = _folder(certs_dir, domain)
    if not folder.is_dir():
        return False
    os.chmod(folder, 0o700)
    # The key first: until the chain lands the pair is mismatched, which validation refuses
    # (the served bundle stays); the watcher sees both renames in one batch anyway.
    atomic_write(folder / PRIVKEY, privkey)
    atomic_write(folder / FULLCHAIN, fullchain)
    _fsync_dir(folder)
    return True


def remove_domain(certs_dir: Path, domain: str) -> bool:
    """Remove a domain's folder (or link). False when it did not exist."""
    folder = _folder(certs_dir, domain)
    if folder.is_symlink():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    else:
        return False
    _fsync_dir(certs_dir)
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
