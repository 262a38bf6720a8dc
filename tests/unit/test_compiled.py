"""The compiled beacon path (setup.py, mypyc): really in use where required, never stale."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgeproxy.metrics
import edgeproxy.proxy.forward
import edgeproxy.proxy.upstream
from edgeproxy import compiled

ROOT = Path(__file__).resolve().parents[2]


def _is_extension(module: object) -> bool:
    return str(getattr(module, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )


def test_required_build_is_in_use() -> None:
    """In CI (EDGEPROXY_REQUIRE_COMPILED=1) the tests must run the compiled modules."""
    modules = [edgeproxy.proxy.forward, edgeproxy.proxy.upstream, edgeproxy.metrics]
    if os.environ.get("EDGEPROXY_REQUIRE_COMPILED") != "1":
        pytest.skip("plain Python allowed here (EDGEPROXY_REQUIRE_COMPILED unset)")
    assert all(_is_extension(m) for m in modules), [m.__file__ for m in modules]


def test_stale_detects_a_changed_source(tmp_path: Path) -> None:
    source = tmp_path / "edgeproxy" / "proxy" / "forward.py"
    source.parent.mkdir(parents=True)
    source.write_text("x = 1\n")
    record = {"edgeproxy/proxy/forward.py": compiled.digest(source)}
    assert compiled.stale(tmp_path, record) == []
    source.write_text("x = 2\n")
    assert compiled.stale(tmp_path, record) == ["edgeproxy/proxy/forward.py"]
    source.unlink()
    assert compiled.stale(tmp_path, record) == ["edgeproxy/proxy/forward.py"]


def test_a_stale_build_refuses_to_import(tmp_path: Path) -> None:
    """An edit after the build: importing edgeproxy fails and says how to rebuild."""
    if not compiled.extensions():
        pytest.skip("not compiled here")
    copy = tmp_path / "edgeproxy"
    subprocess.run(["cp", "-a", str(ROOT / "edgeproxy"), str(copy)], check=True)
    forward = copy / "proxy" / "forward.py"
    forward.write_text(forward.read_text() + "\n# edited\n")
    out = subprocess.run(
        [sys.executable, "-c", "import edgeproxy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert out.returncode == 1
    assert "edgeproxy/proxy/forward.py changed after the beacon path was compiled" in out.stderr
    assert "run `make`" in out.stderr
