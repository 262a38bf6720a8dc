"""Latency the edge adds: wrk keep-alive POST beacons straight to a fast upstream, through
edgeproxy (TLS), and through nginx (TLS) in front of the same upstream, on loopback.

Run: `make bench` (needs Debian's nginx and wrk; installs them with apt-get when missing, and
maps the bench host to 127.0.0.1 in /etc/hosts because wrk takes SNI from the URL).
Writes bench/out/overhead.json and prints a table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeproxy.demo import issue_leaf, make_ca, make_intermediate, pem, write_bundle  # noqa: E402

HOST = "t.bench.test"
UPSTREAM_PORT, EDGE_PORT, NGINX_TLS_PORT, METRICS_PORT = 18081, 18443, 18444, 19100
BEACON = json.dumps(
    {
        "event": "pageview",
        "url": "https://www.example.com/products/42?utm_source=news",
        "referrer": "https://www.example.com/",
        "title": "Product 42",
        "visitor": "v" * 36,
        "screen": "1920x1080",
        "lang": "ja-JP",
        "ts": 1795738000000,
        "props": {"a": 1, "b": "x" * 40},
    }
)


def ensure_tools() -> None:
    missing = [
        t for t in ("nginx", "wrk") if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        pkgs = ["nginx-light" if t == "nginx" else t for t in missing]
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True)
    hosts = Path("/etc/hosts")
    if HOST not in hosts.read_text():
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {HOST}\n")


def nginx_conf(work: Path, name: str, body: str) -> Path:
    conf = work / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {body}
}}
""")
    return conf


def nginx_configs(work: Path, certs: Path) -> tuple[Path, Path]:
    """The upstream (return 204) and the TLS proxy are separate nginx instances, so the
    proxy's CPU seconds count only proxying."""
    upstream = nginx_conf(
        work,
        "upstream",
        f"""
  server {{ listen 127.0.0.1:{UPSTREAM_PORT}; keepalive_requests 100000;
            location / {{ return 204; }} }}""",
    )
    proxy = nginx_conf(
        work,
        "proxy",
        f"""
  upstream backend {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{NGINX_TLS_PORT} ssl;
    server_name {HOST};
    keepalive_requests 100000;
    ssl_certificate {certs}/{HOST}/fullchain.pem;
    ssl_certificate_key {certs}/{HOST}/privkey.pem;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                  proxy_set_header Connection ""; }}
  }}""",
    )
    return upstream, proxy


def wrk(url: str, seconds: int, conns: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50"),
        "p90_ms": ms("90"),
        "p99_ms": ms("99"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    certs = work / "certs"
    root = make_ca()
    inter = make_intermediate(root)
    leaf, key = issue_leaf(inter, HOST)
    write_bundle(certs, HOST, leaf, key, [inter.cert])
    (work / "ca.pem").write_bytes(pem(root.cert))
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(BEACON)}\n"
    )
    config = work / "edge.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{EDGE_PORT}"]
workers = 1
[certs]
dir = "{certs}"
[routes]
"/track" = ["http://127.0.0.1:{UPSTREAM_PORT}"]
[proxy]
long_lived_routes = []
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"
[admin]
listen = ""
[log]
access = false
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx_confs = nginx_configs(work, certs)
    for conf in nginx_confs:
        subprocess.run([nginx, "-c", str(conf)], check=True)
    edge = subprocess.Popen(
        [sys.executable, "-m", "edgeproxy", "serve", "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, list[dict[str, float]]] = {"direct": [], "edgeproxy": [], "nginx": []}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        nginx_pids = children(int((work / "proxy.pid").read_text()))
        edge_pids = children(edge.pid)
        urls = {
            "direct": f"http://127.0.0.1:{UPSTREAM_PORT}/track",
            "edgeproxy": f"https://{HOST}:{EDGE_PORT}/track",
            "nginx": f"https://{HOST}:{NGINX_TLS_PORT}/track",
        }
        for _ in range(args.rounds):
            for name, url in urls.items():  # interleaved: A B C A B C ...
                pids = {"edgeproxy": edge_pids, "nginx": nginx_pids}.get(name, [])
                before = cpu_seconds(pids)
                r = wrk(url, args.seconds, args.connections, script)
                r["cpu_s"] = cpu_seconds(pids) - before
                r["req_per_cpu_s"] = r["rps"] * args.seconds / r["cpu_s"] if r["cpu_s"] else 0
                results[name].append(r)
    finally:
        edge.send_signal(signal.SIGTERM)
        edge.wait(20)
        for conf in nginx_confs:
            subprocess.run([nginx, "-c", str(conf), "-s", "stop"], check=False)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(results, indent=2))

    def median(name: str, key: str) -> float:
        vals = sorted(r[key] for r in results[name])
        return vals[len(vals) // 2]

    print(f"{'path':<10} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/CPU-s':>10}")
    for name in results:
        print(
            f"{name:<10} {median(name, 'rps'):>9.0f} {median(name, 'p50_ms'):>8.3f} "
            f"{median(name, 'p90_ms'):>8.3f} {median(name, 'p99_ms'):>8.3f} "
            f"{median(name, 'req_per_cpu_s'):>10.0f}"
        )
    print(
        f"(medians of {args.rounds} interleaved {args.seconds}s wrk runs, "
        f"{args.connections} keep-alive connections, {len(BEACON)}-byte POST)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
