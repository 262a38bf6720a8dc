"""Whether the beacon path runs compiled, and a refusal to run compiled code that is stale.

setup.py builds the beacon path (edgeproxy/proxy, metrics.py, tls/transport.py) into C
extensions with mypyc, and records the SHA-256 of every source it compiled in
edgeproxy/_build.py. Python imports an extension before the .py beside it, so an extension
left over from before an edit would run the old code, silently: `check()` (run when
edgeproxy is imported) refuses that and says how to rebuild. (Hashes, not times: a rebuild
that generates the same C leaves old file times.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FOLDERS = (PACKAGE, *(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))


class StaleBuildError(ImportError):
    pass


def extensions(folders: tuple[Path, ...] = FOLDERS) -> list[Path]:
    return [
        path
        for folder in folders
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for path in folder.glob("*" + suffix)
    ]


def digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""  # gone: as good as changed


def stale(root: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded sources (paths relative to `root`) whose content changed since."""
    return [name for name, sha in recorded.items() if digest(root / name) != sha]


def check() -> None:
    if not extensions():
        return  # plain Python
    try:
        build = importlib.import_module("edgeproxy._build")
    except ImportError:
        changed = ["(no build record, edgeproxy/_build.py)"]
    else:
        changed = stale(PACKAGE.parent, build.SOURCES)
    if changed:
        raise StaleBuildError(
            f"{', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} changed after "
            "the beacon path was compiled, so the old code would run: run `make` (it "
            "rebuilds), or delete edgeproxy/*.so and edgeproxy/*/*.so to run plain Python"
        )
