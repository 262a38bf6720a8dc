"""CPU time per operation by shared object: edgeproxy's worker beside nginx's, from perf.

bench/instructions.py counts instructions; this shows what they cost in time, which is
what bench/run.py's ratios measure. Under the same load as bench/run.py (its handshake
clients or wrk, the worker alone on CPU 0, clients and upstream on CPU 1), `perf record`
samples each server's worker (cpu-clock, so it works in a VM without hardware counters),
and each object's share of the samples is turned into microseconds per operation with
the worker's CPU time from /proc.

What it showed (session 7, resumed handshakes): both servers spend the same ~240 us in
libcrypto and ~150 us in the kernel; edgeproxy spends ~130 us in libpython, the compiled
beacon path, uvloop and httptools, where nginx's own code takes ~24 us. That Python side
executes ~130k instructions per connection (bench/instructions.py): about one instruction
per nanosecond, against ~9 in libcrypto, because the interpreter's code and data are cold
after each handshake.

Usage (needs perf: Debian's linux-perf, installed with apt-get when missing; ~1 min per
operation):
  bench/cpu_by_object.py                        resumed, full and keepalive
  bench/cpu_by_object.py --ops resumed --seconds 20
  bench/cpu_by_object.py --smoke                resumed only, 5 s: proves the script runs (CI)
Writes bench/out/cpu_by_object.md (cpu_by_object_smoke.md). Not part of `make bench`:
perf's sampling adds a few percent to both servers, so its times are not bench/run.py's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cleanup, interrupt_on_sigterm, log  # noqa: E402
from run import (  # noqa: E402
    EDGE1_METRICS,
    EDGE1_PORT,
    NGINX1_PORT,
    OUT,
    handshake_run,
    keepalive_run,
    pinned,
    setup,
    start_edge,
    start_nginx,
    start_upstream,
    tls_proxy_body,
)

OPS = ("resumed", "full", "keepalive")
SAMPLE_HZ = 4999
_ROW = re.compile(r"^\s+([\d.]+)%\s+(\S.*?)\s*$")


def ensure_perf() -> None:
    if not shutil.which("perf"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "linux-perf"], check=True)


def by_object(data: Path) -> dict[str, float]:
    """Each shared object's share (0-1) of the samples in `data`."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            name = re.sub(r"\.cpython-\d+.*\.so$", ".so", m.group(2))
            shares[name] = shares.get(name, 0.0) + float(m.group(1)) / 100
    return shares


def measure(
    server: dict[str, Any], port: int, op: str, args: Any, script: Path, work: Path
) -> dict[str, Any]:
    """Run `op` against `server` while perf samples its worker; us per op by object."""
    data = work / f"perf-{server['name']}-{op}.data"
    window = max(1.0, args.seconds - 4)  # (clear of the load's start and end)
    perf = subprocess.Popen(
        [
            "bash",
            "-c",
            f"sleep 2; exec perf record -q -F {SAMPLE_HZ} -p {server['workers'][0]}"
            f" -o {data} -- sleep {window}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if op == "keepalive":
        r = keepalive_run(server, port, args, script)
    else:
        r = handshake_run(server, port, args, op == "resumed")
    perf.wait(60)
    us_per_op = 1e6 / r["per_cpu_s"] if r["per_cpu_s"] else float("nan")
    return {
        "us_per_op": us_per_op,
        "objects": {k: v * us_per_op for k, v in by_object(data).items()},
        "stats": r.get("stats", {}),
    }


def report(results: dict[str, dict[str, Any]], ops: list[str]) -> str:
    lines = []
    for op in ops:
        edge, ngx = results[op]["edgeproxy"], results[op]["nginx"]
        lines += [
            f"### {op}: us of worker CPU per operation",
            "",
            "| object | edgeproxy | nginx |",
            "|---|---:|---:|",
        ]
        names = sorted(
            set(edge["objects"]) | set(ngx["objects"]),
            key=lambda k: -(edge["objects"].get(k, 0) + ngx["objects"].get(k, 0)),
        )
        for name in names:
            e, n = edge["objects"].get(name, 0.0), ngx["objects"].get(name, 0.0)
            if max(e, n) >= 0.5:
                lines.append(f"| {name} | {e:.1f} | {n:.1f} |")
        lines.append(f"| **total** | **{edge['us_per_op']:.1f}** | **{ngx['us_per_op']:.1f}** |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per operation and server")
    ap.add_argument("--smoke", action="store_true", help="resumed only, 5 s: proves it runs")
    args = ap.parse_args()
    if args.smoke:
        args.ops, args.seconds = "resumed", 5.0
    ops = [op for op in args.ops.split(",") if op]
    if unknown := set(ops) - set(OPS):
        ap.error(f"unknown operations: {', '.join(sorted(unknown))}")
    load = SimpleNamespace(seconds=args.seconds, hs_procs=3, connections=16, smoke=False)
    interrupt_on_sigterm()
    ensure_perf()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-cpu-by-object-"))
    script = setup(work)
    results: dict[str, dict[str, Any]] = {}
    try:
        upstream = start_upstream(work)
        servers = [
            (start_edge(work, "edgeproxy", EDGE1_PORT, EDGE1_METRICS, 1), EDGE1_PORT),
            (
                start_nginx(work, "nginx", 1, tls_proxy_body(NGINX1_PORT, work / "certs", False)),
                NGINX1_PORT,
            ),
        ]
        for op in ops:
            for server, port in servers:
                with pinned([server], [upstream]):
                    r = measure(server, port, op, load, script, work)
                results.setdefault(op, {})[server["name"]] = r
                log(f"{op} {server['name']}: {r['us_per_op']:.1f} us per operation {r['stats']}")
    finally:
        cleanup()
    text = report(results, ops)
    OUT.mkdir(exist_ok=True)
    (OUT / f"cpu_by_object{'_smoke' if args.smoke else ''}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
