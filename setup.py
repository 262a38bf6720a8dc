"""The beacon path, optionally compiled: edgeproxy/proxy built as C extensions by mypyc,
and the client connections' C core (edgeproxy/tls/_conn.c, linked to the system's libssl).

mypyc (part of mypy, already our type checker) compiles these strictly typed modules as
they are, so the same source runs compiled or as plain Python. Compiled, a keep-alive beacon
costs ~40% less Python time in process; see bench/RESULTS.md for what it gives end to end.

Built only when asked (EDGEPROXY_COMPILE=1), with the runtime dependencies installed (mypyc
type-checks against them): `make` does it in place and again whenever a source changes, the
Dockerfile in its build stage. Everything else in pyproject.toml.
"""

import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup

# The beacon path: every module of edgeproxy/proxy, the histograms it observes into and
# the client connections' TLS transport.
HOT = sorted(str(p) for p in Path("edgeproxy/proxy").glob("*.py") if p.name != "__init__.py")
HOT += ["edgeproxy/metrics.py", "edgeproxy/tls/transport.py"]
# Client connections in C (tls/native.py says when they serve): OpenSSL's headers needed.
CORE = "edgeproxy/tls/_conn.c"


def ext_modules() -> list[object]:
    if os.environ.get("EDGEPROXY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # What is compiled, by content: edgeproxy/compiled.py refuses to run an outdated build.
    record = {name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in [*HOT, CORE]}
    Path("edgeproxy/_build.py").write_text(
        '"""Written by setup.py: the sources the compiled beacon path was built from."""\n\n'
        f"SOURCES = {record!r}\n"
    )

    # The shared runtime goes beside the modules (edgeproxy/proxy/_hot__mypyc*.so), not at
    # the top of site-packages under a hash name.
    core = Extension(
        "edgeproxy.tls._conn",
        [CORE],
        libraries=["ssl", "crypto"],
        extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
    )
    return [*mypycify(HOT, opt_level="3", group_name="edgeproxy.proxy._hot"), core]


setup(ext_modules=ext_modules())
