"""Instructions an edgeproxy worker executes per operation, counted by callgrind.

CPU time on this VM drifts by ±15% from hour to hour, and interleaved runs of bench/run.py
resolve about ±3%: a change worth 1% can't be told from noise. Callgrind counts the
instructions a process executes, which repeat to ~0.1% here, so two builds can be
compared on what each operation costs them:

- `resumed`: a new TLS 1.3 connection offering the previous session ticket, one beacon;
- `full`: a new connection offering no session (an RSA-2048 signature), one beacon;
- `keepalive`: one more beacon on an open connection.

The edge runs under `valgrind --tool=callgrind` with counting off; it is switched on in the
worker (callgrind_control) only around the measured operations, after a warm-up. What it
can't show: the kernel's instructions (syscalls, TCP), and time. An instruction of Python
costs far more time than one of OpenSSL's: perf put the worker's instructions per cycle at
~0.3 in libpython against ~2.7 in libcrypto (cache-cold interpreter, tight big-number code),
so Python's share of the count is much smaller than its share of CPU time. Use it to
compare builds, and bench/run.py for what it is worth against nginx.

nginx (Debian's, one process: `master_process off`) is counted the same way, last, as the
reference: it shows what the edge executes beyond the same OpenSSL work (the two
libcrypto counts should match to ~1%).

Usage (needs Debian's valgrind, installed with apt-get when missing; ~1 min per build):
  bench/instructions.py                         this checkout, 300 connections / 2,000 beacons
  bench/instructions.py --root /tmp/old --root .   two builds, e.g. a `git worktree` of main
  bench/instructions.py --smoke                 a few operations: proves the script runs
  bench/instructions.py --no-nginx              without the nginx reference
A --root must be a checkout with its beacon path built as `make` builds it (or none at all,
for plain Python); the script says which it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import children, cleanup, interrupt_on_sigterm, log, nginx_bin, spawn  # noqa: E402
from run import (  # noqa: E402
    HOST,
    LOOP,
    ROOT,
    client_ctx,
    edge_config,
    http_get,
    nginx_conf,
    read_head,
    request,
    setup,
    start_upstream,
    tls_proxy_body,
)

EDGE_PORT = 18448
METRICS_PORT = 19102
OPS = ("resumed", "full", "keepalive")
WARMUP = 20


def ensure_valgrind() -> None:
    if not shutil.which("valgrind") or not shutil.which("callgrind_annotate"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True)


class Client:
    """The operations, from this process: blocking sockets, one at a time."""

    def __init__(self) -> None:
        self.ctx = client_ctx()
        self.session: ssl.SSLSession | None = None
        self.resumed = 0
        self.kept: ssl.SSLSocket | None = None

    def connection(self, resume: bool) -> None:
        with (
            socket.create_connection((LOOP, EDGE_PORT), timeout=60) as raw,
            self.ctx.wrap_socket(
                raw, server_hostname=HOST, session=self.session if resume else None
            ) as tls,
        ):
            tls.sendall(request(close=True))
            status, _ = read_head(tls)
            if status != 204:
                raise RuntimeError(f"beacon answered {status}")
            self.resumed += bool(tls.session_reused)
            if resume:
                self.session = tls.session
            try:  # the edge closes first (as in bench/run.py's handshake loop)
                while tls.recv(4096):
                    pass
            except OSError:
                pass

    def beacon(self) -> None:
        if self.kept is None:
            raw = socket.create_connection((LOOP, EDGE_PORT), timeout=60)
            self.kept = self.ctx.wrap_socket(raw, server_hostname=HOST)
        self.kept.sendall(request(close=False))
        status, rest = read_head(self.kept)
        if status != 204 or rest:
            raise RuntimeError(f"beacon answered {status} (+{len(rest)} bytes)")

    def run(self, op: str) -> None:
        if op == "keepalive":
            self.beacon()
        else:
            self.connection(resume=op == "resumed")


NGINX = Path("nginx")
"""Stands for the nginx reference among the --root checkouts."""

VALGRIND = [
    "valgrind",
    "--tool=callgrind",
    "--trace-children=yes",
    "--instr-atstart=no",
]


def start_nginx_counted(work: Path, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx as bench/run.py configures it, one process, under callgrind with counting off."""
    body = tls_proxy_body(EDGE_PORT, work / "certs", False)
    conf = nginx_conf(work, "nginx-counted", 1, body)
    # One process: the worker is the process callgrind starts (no master to fork it).
    conf.write_text("master_process off;\n" + conf.read_text())
    (work / "nginx-counted-tmp").mkdir(exist_ok=True)
    cmd = [*VALGRIND, f"--callgrind-out-file={out}/callgrind.%p", nginx_bin(), "-c", str(conf)]
    p = spawn(cmd, out / "valgrind.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"nginx under valgrind exited; see {out}/valgrind.log")
        try:
            socket.create_connection((LOOP, EDGE_PORT), timeout=5).close()
            return p, p.pid
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("nginx under valgrind not listening in 120 s")


def start_edge(work: Path, root: Path, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The edge of checkout `root`, under callgrind with counting off; returns its worker."""
    config = edge_config(work, "edge", EDGE_PORT, METRICS_PORT, 1)
    cmd = [
        *VALGRIND,
        f"--callgrind-out-file={out}/callgrind.%p",
        sys.executable,
        "-m",
        "edgeproxy",
        "serve",
        "--config",
        str(config),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    p = spawn(cmd, out / "valgrind.log", cwd=root, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"edge under valgrind exited; see {out}/valgrind.log")
        try:
            if http_get(METRICS_PORT, "/readyz", 10)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("edge under valgrind not ready in 300 s")
    control = json.loads(http_get(METRICS_PORT, "/healthz", 30)[1])["pid"]
    workers = [k for k in children(p.pid) if k != control]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker, found {workers}")
    return p, workers[0]


_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*?)\s+\[(.+)\]\s*$")


def by_object(dump: Path) -> Counter[str]:
    """Instructions of one dump by shared object (self cost: no double counting)."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects: Counter[str] = Counter()
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            name = Path(m.group(3)).name
            name = re.sub(r"\.cpython-\d+.*\.so$", ".so", name)  # _hot__mypyc.so, loop.so, ...
            objects[name] += int(m.group(1).replace(",", ""))
    return objects


def measure(root: Path, work: Path, ops: list[str], n: dict[str, int]) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix="callgrind-", dir=work))
    if root == NGINX:
        log("nginx (reference): starting it under callgrind")
        p, worker = start_nginx_counted(work, out)
        results: dict[str, object] = {"root": "nginx", "compiled": None}
    else:
        built = (root / "edgeproxy" / "_build.py").exists()
        how = "compiled" if built else "plain Python"
        log(f"{root}: starting the edge under callgrind ({how})")
        p, worker = start_edge(work, root, out)
        results = {"root": str(root), "compiled": built}
    client = Client()
    try:
        for op in ops:
            for _ in range(WARMUP):
                client.run(op)
            time.sleep(0.5)
            before = set(out.glob(f"callgrind.{worker}.*"))
            _control("-i", "on", worker)
            client.resumed = 0
            t0 = time.monotonic()
            for _ in range(n[op]):
                client.run(op)
            took = time.monotonic() - t0
            _control("-i", "off", worker)
            _control("-d", worker)
            objects = by_object(_wait_dump(out, worker, before))
            total = sum(objects.values())
            results[op] = {
                "n": n[op],
                "resumed": client.resumed,
                "per_op": total / n[op],
                "objects": {k: v / n[op] for k, v in objects.most_common(8)},
                "seconds": took,
            }
            per_op = total / n[op] / 1e3
            log(f"  {op}: {per_op:,.1f}k instructions per operation ({n[op]} in {took:.0f} s)")
            if op == "resumed" and client.resumed != n[op]:
                raise RuntimeError(f"only {client.resumed} of {n[op]} connections resumed")
            if op == "full" and client.resumed:
                raise RuntimeError(f"{client.resumed} 'full' connections resumed")
    finally:
        if client.kept is not None:
            client.kept.close()
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    return results


def _control(*args: str | int) -> None:
    """callgrind_control: counting on or off in the worker, or a dump of what it counted."""
    cmd = ["callgrind_control", *map(str, args)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_dump(out: Path, worker: int, before: set[Path]) -> Path:
    """The dump callgrind_control -d asked for: the worker's first one not in `before`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [d for d in out.glob(f"callgrind.{worker}.*") if d not in before]
        if new and new[0].stat().st_size > 0:
            time.sleep(0.5)  # (written whole by now)
            return new[0]
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def report(results: list[dict[str, object]], ops: list[str]) -> str:
    lines = ["| build | " + " | ".join(f"{op} (instructions per op)" for op in ops) + " |"]
    lines.append("|---" * (len(ops) + 1) + "|")
    base = results[0]
    for r in results:
        cells = []
        for op in ops:
            v = r[op]["per_op"]  # type: ignore[index]
            b = base[op]["per_op"]  # type: ignore[index]
            cells.append(f"{v / 1e3:,.1f}k" + ("" if r is base else f" ({v / b - 1:+.2%})"))
        tag = {None: "reference", True: "compiled", False: "plain Python"}[r["compiled"]]  # type: ignore[index]
        lines.append(f"| {r['root']} ({tag}) | " + " | ".join(cells) + " |")
    lines.append("")
    ref = next((r for r in results if r["compiled"] is None), None)
    for r in results:
        if ref is None or r is ref:
            continue
        extra = ", ".join(
            f"{op} {(r[op]['per_op'] - ref[op]['per_op']) / 1e3:+,.1f}k"  # type: ignore[index]
            for op in ops
        )
        lines.append(f"- {r['root']} executes beyond nginx, per operation: {extra}")
    for r in results:
        for op in ops:
            parts = ", ".join(
                f"{k} {v / 1e3:,.1f}k"
                for k, v in r[op]["objects"].items()  # type: ignore[index]
            )
            lines.append(f"- {r['root']} {op}: {parts}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", type=Path, help="a checkout (repeat to compare)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    ap.add_argument("-n", type=int, default=300, help="connections per connection operation")
    ap.add_argument("--beacons", type=int, default=2000, help="keep-alive beacons")
    ap.add_argument("--smoke", action="store_true", help="a few operations: proves it runs")
    ap.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    args = ap.parse_args()
    ops = [op for op in args.ops.split(",") if op]
    if unknown := set(ops) - set(OPS):
        ap.error(f"unknown operations: {', '.join(sorted(unknown))}")
    n = {"resumed": args.n, "full": args.n, "keepalive": args.beacons}
    if args.smoke:
        n = {"resumed": 5, "full": 3, "keepalive": 20}
    roots = [r.resolve() for r in (args.root or [ROOT])]
    if not args.no_nginx:
        roots.append(NGINX)
    interrupt_on_sigterm()
    ensure_valgrind()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-instructions-"))
    setup(work)
    results = []
    try:
        start_upstream(work)
        for root in roots:
            results.append(measure(root, work, ops, n))
    finally:
        cleanup()
    print(report(results, ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
