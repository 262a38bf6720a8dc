"""edgeproxy against nginx, interleaved (A B A B ...), on loopback: proxy CPU efficiency,
throughput and latency for the traffic an edge sees.

Scenarios (each reports requests or handshakes per proxy CPU-second, throughput, p50/p99 and
the edgeproxy/nginx ratio; medians over the rounds):
1. keep-alive beacons: wrk over TLS, keep-alive POSTs of a ~300-byte JSON beacon to /track;
2. full RSA-2048 handshakes: a new connection per request, no session offered (a Python
   multi-process client; every connection's `session_reused` is counted as proof);
3. resumed handshakes: the same client, each connection offers the newest TLS 1.3 ticket;
4. p99 latency the proxy adds at half its saturation rate: an open-loop, rate-limited
   keep-alive client in C (bench/openloop.c; latency from each request's *scheduled* send
   time, so queueing behind a slow response counts, as in wrk2), through the proxy minus
   straight to the upstream; the proxy's worker pinned to CPU 0, client and upstream to CPU 1;
5. keep-alive efficiency of edgeproxy with `workers = 2` against `workers = 1`;
6. TLS session resumption across workers (`workers = 2`): a ticket from one connection is
   offered on new connections; each connection's worker is found from /proc (socket inode
   -> pid), so resumption is counted for "same worker" and "other worker" separately.

Proxy CPU = utime + stime from /proc/<pid>/stat of the proxy's *worker* processes only:
edgeproxy's workers (its supervisor and control process are excluded from the ratio; their
CPU is reported separately), nginx's workers (master excluded). The upstream (`return 204`)
is its own nginx instance, so proxy CPU counts only proxying.

Run: `.venv/bin/python bench/run.py` (full, ~10 min), `--smoke` (< 60 s, proves the script
works, no thresholds), `--profile` (py-spy of one edgeproxy worker under wrk keep-alive load;
needs /tmp/pyspy-venv/bin/py-spy). Needs Debian's nginx, wrk, gcc and libssl-dev (installed
with apt-get when missing) and maps the bench host to 127.0.0.1 in /etc/hosts (wrk takes SNI
from the URL).
Writes bench/out/run.{md,json} (smoke: run_smoke.*; profile: profile[_native].{md,txt}).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    children,
    cleanup,
    forked,
    interrupt_on_sigterm,
    log,
    nginx_bin,
    ports_free,
    spawn,
)

from edgeproxy.demo import issue_leaf, make_ca, make_intermediate, pem, write_bundle  # noqa: E402
from edgeproxy.tls.sni import INTERMEDIATE_CIPHERS  # noqa: E402

OUT = ROOT / "bench" / "out"
LOOP = "127.0.0.1"
HOST = "t.bench.test"
UPSTREAM_PORT = 18081
EDGE1_PORT, EDGE2_PORT, NGINX1_PORT, NGINX2_PORT = 18443, 18445, 18444, 18446
RELAY_PORT = 18447
EDGE1_METRICS, EDGE2_METRICS = 19100, 19101
PYSPY = Path("/tmp/pyspy-venv/bin/py-spy")
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
).encode()


def request(close: bool) -> bytes:
    return (
        b"POST /track HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(BEACON)).encode()
        + b"\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + BEACON
    )


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def run_procs(
    target: Callable[..., None], argss: list[tuple[Any, ...]], timeout: float
) -> list[dict[str, Any]]:
    """Run target(*args, queue) in forked processes; collect one dict from each."""
    fork = mp.get_context("fork")
    q = fork.Queue()
    procs = [fork.Process(target=target, args=(*a, q), daemon=True) for a in argss]
    for p in procs:
        forked.append(p)
        p.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            with suppress(Exception):
                results.append(q.get(timeout=1))
                continue
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    finally:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()) if p.is_alive() else 1)
            if p.is_alive():
                p.kill()
                p.join(5)
            forked.remove(p)
    if len(results) < len(procs):
        raise RuntimeError(f"{len(procs) - len(results)} load processes returned nothing")
    return results


# ---------------------------------------------------------------------------------------------
# servers


def ensure_tools() -> None:
    missing = [
        t for t in ("nginx", "wrk") if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()
    ]
    pkgs = ["nginx-light" if t == "nginx" else t for t in missing]
    if not shutil.which("gcc"):  # bench/openloop.c, scenario 4's client
        pkgs.append("gcc")
    if not Path("/usr/include/openssl/ssl.h").exists():
        pkgs.append("libssl-dev")
    if pkgs:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True)
    hosts = Path("/etc/hosts")
    if not re.search(rf"^127\.0\.0\.1\s.*\b{re.escape(HOST)}\b", hosts.read_text(), re.M):
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {HOST}\n")


def nginx_conf(work: Path, name: str, workers: int, body: str) -> Path:
    conf = work / f"{name}.conf"
    conf.write_text(f"""
daemon off;
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/{name}-tmp;
  proxy_temp_path {work}/{name}-tmp;
  {body}
}}
""")
    return conf


def tls_proxy_body(port: int, certs: Path, reuseport: bool) -> str:
    """edgeproxy's TLS policy (1.2 + 1.3, its 1.2 ciphers); nginx defaults otherwise
    (stateless session tickets on, ticket keys made by the master so all workers share them;
    no session cache). nginx 1.22's default protocols lack TLS 1.3, hence ssl_protocols."""
    return f"""
  upstream backend {{ server {LOOP}:{UPSTREAM_PORT}; keepalive 64; }}
  server {{
    listen {LOOP}:{port} ssl{" reuseport" if reuseport else ""};
    server_name {HOST};
    keepalive_requests 1000000;
    ssl_certificate {certs}/{HOST}/fullchain.pem;
    ssl_certificate_key {certs}/{HOST}/privkey.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {INTERMEDIATE_CIPHERS};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                  proxy_set_header Connection ""; }}
  }}"""


def start_nginx(work: Path, name: str, workers: int, body: str) -> dict[str, Any]:
    (work / f"{name}-tmp").mkdir(exist_ok=True)
    conf = nginx_conf(work, name, workers, body)
    p = spawn([nginx_bin(), "-c", str(conf)], work / f"{name}-stderr.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(children(p.pid)) < workers:
        if p.poll() is not None:
            raise RuntimeError(f"nginx {name} exited: {(work / f'{name}-error.log').read_text()}")
        time.sleep(0.05)
    time.sleep(0.2)
    return {"name": name, "proc": p, "workers": children(p.pid), "other": [p.pid]}


def start_upstream(work: Path) -> dict[str, Any]:
    """The fixed upstream every scenario forwards to: nginx answering 204, keep-alive."""
    return start_nginx(
        work,
        "upstream",
        1,
        f"server {{ listen {LOOP}:{UPSTREAM_PORT}; keepalive_requests 1000000;\n"
        "           location / { return 204; } }",
    )


def start_relay(work: Path) -> dict[str, Any]:
    """bench/relay.py: a bare relay on uvloop's TLS (no HTTP), see its docstring."""
    folder = work / "certs" / HOST
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "relay.py"),
        str(RELAY_PORT),
        str(UPSTREAM_PORT),
        str(folder / "fullchain.pem"),
        str(folder / "privkey.pem"),
    ]
    p = spawn(cmd, work / "relay-stderr.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"relay exited: {(work / 'relay-stderr.log').read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex((LOOP, RELAY_PORT)) == 0:
                break
        time.sleep(0.05)
    return {"name": "relay", "proc": p, "workers": [p.pid], "other": []}


def edge_config(work: Path, name: str, port: int, metrics: int, workers: int) -> Path:
    config = work / f"{name}.toml"
    config.write_text(f"""
[server]
listen = ["{LOOP}:{port}"]
workers = {workers}
[certs]
dir = "{work}/certs"
trust_bundle = "{work}/ca.pem"
state_dir = "{work}/{name}-state"
[routes]
"/track" = ["http://{LOOP}:{UPSTREAM_PORT}"]
[proxy]
long_lived_routes = []
[metrics]
listen = "{LOOP}:{metrics}"
[admin]
listen = ""
[log]
level = "error"
access = false
""")
    return config


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{LOOP}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_edge(work: Path, name: str, port: int, metrics: int, workers: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    config = edge_config(work, name, port, metrics, workers)
    cmd = [sys.executable, "-m", "edgeproxy", "serve", "--config", str(config)]
    p = spawn(cmd, work / f"{name}-stderr.log", cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"edge {name} exited {p.returncode}; see {work}/{name}-stderr.log")
        with suppress(OSError):
            if http_get(metrics, "/readyz", 2)[0] == 200:
                break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"edge {name} not ready in 60 s")
    control = json.loads(http_get(metrics, "/healthz")[1])["pid"]
    kids = children(p.pid)
    workers_ = [k for k in kids if k != control]
    if len(workers_) != workers:
        raise RuntimeError(f"edge {name}: expected {workers} workers, found {workers_}")
    return {
        "name": name,
        "proc": p,
        "workers": workers_,
        "other": [p.pid, control],
        "metrics_port": metrics,
        "stderr": work / f"{name}-stderr.log",
    }


def edge_metrics(metrics_port: int) -> dict[str, float]:
    """The counters worth checking: handshakes, upstream errors, requests by status class."""
    out: dict[str, float] = {}
    with suppress(OSError):
        body = http_get(metrics_port, "/metrics", 10)[1].decode()
        for line in body.splitlines():
            if line.startswith(
                (
                    "edgeproxy_tls_handshakes_total",
                    "edgeproxy_upstream_errors_total",
                    "edgeproxy_request_duration_seconds_count",
                )
            ):
                key, value = line.rsplit(" ", 1)
                if float(value):
                    out[key] = float(value)
    return out


def stderr_summary(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"lines": 0}
    msgs = Counter[str]()
    for line in lines:
        try:
            doc = json.loads(line)
            msgs[f"{doc.get('level')}: {str(doc.get('msg'))[:160]}"] += 1
        except ValueError:
            msgs[f"raw: {line[:160]}"] += 1
    return {"lines": len(lines), "top": dict(msgs.most_common(8))}


# ---------------------------------------------------------------------------------------------
# loaders


def wrk(url: str, seconds: float, conns: int, script: Path, threads: int = 1) -> dict[str, Any]:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "requests": num(r"(\d+) requests in"),
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": num(r"Non-2xx or 3xx responses: (\d+)"),
        "socket_errors": [int(x) for x in sock.groups()] if sock else [0, 0, 0, 0],
        "cmd": " ".join([*cmd, url]),
    }


def client_ctx() -> ssl.SSLContext:
    """No verification in the load loops (the chain is verified once at start)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def read_head(sock: socket.socket | ssl.SSLSocket, buf: bytes = b"") -> tuple[int, bytes]:
    """Read one response head (the upstream's 204 has no body). Returns status, leftover."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return int(head[9:12]), rest


def verify_chain(port: int, ca: Path) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((LOOP, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(request(close=True))
        status, _ = read_head(tls)
        return {"status": status, "version": tls.version(), "cipher": (tls.cipher() or ("?",))[0]}


def _hs_loop(port: int, seconds: float, resume: bool, seed: int, q: Any) -> None:
    """New connection per request; `resume` offers the newest session ticket each time."""
    ctx = client_ctx()
    req = request(close=True)
    lat: list[float] = []
    stats: Counter[str] = Counter()
    session: ssl.SSLSession | None = None
    if resume:  # prime: a first full handshake gives the first ticket (not counted)
        with (
            socket.create_connection((LOOP, port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            tls.sendall(req)
            read_head(tls)
            session = tls.session
    versions: Counter[str] = Counter()
    end = time.monotonic() + seconds
    for _ in range(10_000_000):
        if time.monotonic() >= end:
            break
        t0 = time.perf_counter()
        try:
            with socket.create_connection((LOOP, port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
                    tls.sendall(req)
                    status, _ = read_head(tls)
                    lat.append(time.perf_counter() - t0)
                    stats["ok" if status == 204 else f"status_{status}"] += 1
                    stats["resumed" if tls.session_reused else "full"] += 1
                    stats["offered_session"] += session is not None
                    versions[f"{tls.version()} {(tls.cipher() or ('?',))[0]}"] += 1
                    if resume and tls.session is not None:
                        session = tls.session
                    with suppress(OSError):  # let the server close first (its TIME_WAIT)
                        tls.settimeout(2)
                        while tls.recv(4096):
                            pass
        except (OSError, ssl.SSLError) as exc:
            stats[f"error {type(exc).__name__}: {str(exc)[:60]}"] += 1
    q.put({"lat": lat, "stats": dict(stats), "versions": dict(versions)})


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# ---------------------------------------------------------------------------------------------
# measurements


def measure(server: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn while counting the CPU of the server's worker processes (and its others)."""
    w0, o0, t0 = cpu_seconds(server["workers"]), cpu_seconds(server["other"]), time.monotonic()
    m0 = edge_metrics(server["metrics_port"]) if "metrics_port" in server else {}
    r = fn()
    r["cpu_s"] = round(cpu_seconds(server["workers"]) - w0, 3)
    r["other_cpu_s"] = round(cpu_seconds(server["other"]) - o0, 3)
    r["wall_s"] = round(time.monotonic() - t0, 2)
    if m0:
        m1 = edge_metrics(server["metrics_port"])
        r["metrics_delta"] = {k: v - m0.get(k, 0.0) for k, v in m1.items() if v - m0.get(k, 0.0)}
    return r


def keepalive_run(server: dict[str, Any], port: int, args: Any, script: Path) -> dict[str, Any]:
    r = measure(
        server, lambda: wrk(f"https://{HOST}:{port}/track", args.seconds, args.connections, script)
    )
    r["per_cpu_s"] = r["requests"] / r["cpu_s"] if r["cpu_s"] else 0.0
    r["worker_util"] = r["cpu_s"] / args.seconds
    return r


def handshake_run(server: dict[str, Any], port: int, args: Any, resume: bool) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        t0 = time.monotonic()
        parts = run_procs(
            _hs_loop,
            [(port, args.seconds, resume, i) for i in range(args.hs_procs)],
            args.seconds + 60,
        )
        took = time.monotonic() - t0
        lat = [x for p in parts for x in p["lat"]]
        stats: Counter[str] = Counter()
        versions: Counter[str] = Counter()
        for p in parts:
            stats.update(p["stats"])
            versions.update(p["versions"])
        return {
            "requests": len(lat),
            "rps": len(lat) / args.seconds,
            "p50_ms": pct(lat, 50) * 1000,
            "p99_ms": pct(lat, 99) * 1000,
            "stats": dict(stats),
            "versions": dict(versions),
            "took_s": round(took, 2),
        }

    r = measure(server, go)
    r["per_cpu_s"] = r["requests"] / r["cpu_s"] if r["cpu_s"] else 0.0
    r["worker_util"] = r["cpu_s"] / args.seconds
    return r


def rate_run(
    work: Path, server: dict[str, Any] | None, port: int, use_tls: bool, rate: float, args: Any
) -> dict[str, Any]:
    """Scenario 4's open-loop load at `rate` (bench/openloop.c, built by build_openloop)."""
    # As many keep-alive connections as the Python client of sessions 3-5 kept (8 per
    # 2,500 req/s), so runs before and after it offer the same concurrency.
    conns = 8 * (int(rate // 2500) + 1)

    def go() -> dict[str, Any]:
        out = work / "latencies.txt"
        cmd = [
            str(work / "openloop"),
            LOOP,
            str(port),
            HOST if use_tls else "-",
            str(work / "ca.pem") if use_tls else "-",
            str(rate),
            str(args.seconds),
            str(conns),
            str(work / "beacon.http"),
            str(out),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.seconds + 60, check=True
        )
        summary = json.loads(done.stdout)
        lat = [int(x) / 1e9 for x in out.read_text().split()]
        stats = {
            k: summary[k]
            for k in ("ok", "non_204", "unsent", "unanswered", "closed_by_server", "errors")
        }
        return {
            "target_rps": round(rate, 1),
            "achieved_rps": round(len(lat) / summary["elapsed"], 1),
            "connections": conns,
            "requests": len(lat),
            "p50_ms": pct(lat, 50) * 1000,
            "p90_ms": pct(lat, 90) * 1000,
            "p99_ms": pct(lat, 99) * 1000,
            "p999_ms": pct(lat, 99.9) * 1000,
            "max_ms": max(lat) * 1000 if lat else float("nan"),
            "max_send_lag_ms": summary["max_send_lag_ms"],
            "stats": stats,
        }

    if server is None:
        return go()
    r = measure(server, go)
    r["worker_util"] = r["cpu_s"] / args.seconds
    return r


@contextlib.contextmanager
def pinned(proxies: list[dict[str, Any]], others: list[dict[str, Any]]) -> Iterator[bool]:
    """Proxy workers on CPU 0; this script, its load processes and the upstream on CPU 1.

    Scenario 4 measures latency the proxy adds, not CPU contention: unpinned, the open-loop
    client and the upstream take turns with the proxy's worker on 2 cores, and scheduling
    waits of milliseconds land in the proxy's p99 (one unpinned run showed 110 ms at half
    of edgeproxy's saturation). Both proxies get the same split. Yields False (and pins
    nothing) on a 1-CPU machine.
    """
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2 or not {0, 1} <= cpus:
        yield False
        return
    proxy = [pid for s in proxies for pid in s["workers"]]
    rest = [pid for s in others for pid in (*s["workers"], *s.get("other", []))]
    rest.append(os.getpid())  # the clients are forked from here: they inherit CPU 1
    for pid in proxy:
        os.sched_setaffinity(pid, {0})
    for pid in rest:
        os.sched_setaffinity(pid, {1})
    try:
        yield True
    finally:
        for pid in (*proxy, *rest):
            with suppress(OSError):
                os.sched_setaffinity(pid, cpus)


def owners(port: int, pids: list[int]) -> dict[int, int]:
    """client port -> pid of the server process holding the accepted socket (via inodes)."""
    inode_port: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], f[9]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) != 0:
            inode_port[inode] = int(remote.split(":")[1], 16)
    out: dict[int, int] = {}
    for pid in pids:
        with suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        ino = link[8:-1]
                        if ino in inode_port:
                            out[inode_port[ino]] = pid
    return out


def cross_worker(port: int, workers: list[int], trials: int, per_trial: int) -> dict[str, Any]:
    """Per trial: one full handshake gives a ticket; `per_trial` new connections offer it;
    all are held open until their worker is identified."""
    ctx = client_ctx()
    req = request(close=False)
    rows: Counter[str] = Counter()
    origin_workers: Counter[int] = Counter()
    unknown = 0
    for _ in range(trials):
        conns: list[ssl.SSLSocket] = []
        try:
            first = ctx.wrap_socket(
                socket.create_connection((LOOP, port), timeout=5), server_hostname=HOST
            )
            conns.append(first)
            first.sendall(req)
            read_head(first)
            session = first.session
            for _ in range(per_trial):
                c = ctx.wrap_socket(
                    socket.create_connection((LOOP, port), timeout=5),
                    server_hostname=HOST,
                    session=session,
                )
                conns.append(c)
                c.sendall(req)
                read_head(c)
            time.sleep(0.02)
            who = owners(port, workers)
            w0 = who.get(first.getsockname()[1])
            origin_workers[w0 or 0] += 1
            for c in conns[1:]:
                w = who.get(c.getsockname()[1])
                if w is None or w0 is None:
                    unknown += 1
                    continue
                where = "same" if w == w0 else "other"
                rows[f"{where}_{'resumed' if c.session_reused else 'full'}"] += 1
        finally:
            for c in conns:
                with suppress(OSError):
                    c.close()
    same = rows["same_resumed"] + rows["same_full"]
    other = rows["other_resumed"] + rows["other_full"]
    return {
        "connections": same + other,
        "resumed": rows["same_resumed"] + rows["other_resumed"],
        "resumed_fraction": (rows["same_resumed"] + rows["other_resumed"]) / max(1, same + other),
        "same_worker": same,
        "same_worker_resumed": rows["same_resumed"],
        "other_worker": other,
        "other_worker_resumed": rows["other_resumed"],
        "unknown_owner": unknown,
        "origin_workers": {str(k): v for k, v in origin_workers.items()},
    }


# ---------------------------------------------------------------------------------------------
# report


def med(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(x: float, digits: int = 0) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )

    def cmd(*c: str) -> str:
        with suppress(OSError):
            p = subprocess.run(c, capture_output=True, text=True, check=False)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        return "?"

    digest = hashlib.sha256()
    sources = [*(ROOT / "edgeproxy").rglob("*.py"), *(ROOT / "edgeproxy").rglob("*.c")]
    for f in sorted(sources):
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    # setup.py may have compiled the beacon path (make does when it can), and the client
    # connections are C where built and fitting (tls/native.py): say which ran.
    probe = (
        "import edgeproxy.proxy.forward as f; from edgeproxy.tls import native; "
        "print(f.__file__); print(native.unavailable())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout.splitlines()
    where, why = (out + ["", "?"])[:2]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "beacon_path": "compiled by mypyc" if where.endswith(".so") else "plain Python",
        "connections": "C (tls/_conn.c)" if not why else f"Python ({why})",
        "nproc": cmd("nproc"),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
        "nginx": cmd(nginx_bin(), "-v"),
        "wrk": cmd("wrk", "-v"),
        "git_head": git("rev-parse", "--short", "HEAD"),
        "edgeproxy_dirty_files": git("status", "--porcelain", "--", "edgeproxy").splitlines(),
        "edgeproxy_source_sha256": digest.hexdigest()[:12],
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def render(res: dict[str, Any]) -> str:
    m, a, sc = res["machine"], res["args"], res["scenarios"]
    dirty = ", dirty: " + " ".join(m["edgeproxy_dirty_files"]) if m["edgeproxy_dirty_files"] else ""
    lines = [
        f"## Run: edgeproxy vs nginx ({m['date']}{', SMOKE' if a['smoke'] else ''})",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python "
        f"{m['python']} ({m['openssl_python']}), {m['nginx']}, {m['wrk']}. edgeproxy at "
        f"{m['git_head']} (source sha256 {m['edgeproxy_source_sha256']}"
        f"{dirty}; beacon path {m.get('beacon_path', '?')}; client connections "
        f"{m.get('connections', '?')}"
        f"). Load average at start {' '.join(m['loadavg_start'])}, at end "
        f"{' '.join(m.get('loadavg_end', []))}.",
        "",
        f"Command: `{res['command']}` ({a['rounds']} interleaved rounds, {a['seconds']} s per "
        f"run, medians shown). Proxy CPU = utime+stime of the proxy's worker processes "
        "(edgeproxy: supervisor and control process excluded, shown apart below; nginx: "
        "master excluded). One worker each unless stated. Upstream: a separate nginx "
        "`return 204`. All on 127.0.0.1.",
        "",
        "| scenario | metric | edgeproxy | nginx | edgeproxy/nginx |",
        "|---|---|---:|---:|---:|",
    ]

    def rows(title: str, e: list[dict[str, Any]], n: list[dict[str, Any]], unit: str) -> None:
        for key, label, d in (
            ("per_cpu_s", f"{unit} per proxy CPU-s", 0),
            ("rps", f"{unit}/s (throughput)", 0),
            ("p50_ms", "p50 ms", 3),
            ("p99_ms", "p99 ms", 3),
            ("worker_util", "proxy worker CPU (cores)", 2),
        ):
            ev, nv = med(e, key), med(n, key)
            lines.append(
                f"| {title} | {label} | {fmt(ev, d)} | {fmt(nv, d)} | {fmt(ratio(ev, nv), 2)} |"
            )

    if "keepalive" in sc:
        rows("1 keep-alive beacons", sc["keepalive"]["edgeproxy"], sc["keepalive"]["nginx"], "req")
    if "full_handshake" in sc:
        s = sc["full_handshake"]
        rows("2 full RSA handshakes", s["edgeproxy"], s["nginx"], "hs")
    if "resumed_handshake" in sc:
        s = sc["resumed_handshake"]
        rows("3 resumed handshakes", s["edgeproxy"], s["nginx"], "hs")
    if "latency_at_half" in sc:
        s = sc["latency_at_half"]
        e_add = med(s["edgeproxy"], "p99_ms") - med(s["direct_at_edge_rate"], "p99_ms")
        n_add = med(s["nginx"], "p99_ms") - med(s["direct_at_edge_rate"], "p99_ms")
        lines.append(
            f"| 4 latency at {fmt(s['rate'])} req/s (½ edgeproxy saturation) | p99 ms added "
            f"(proxy − direct) | {fmt(e_add, 3)} | {fmt(n_add, 3)} | "
            f"{fmt(ratio(e_add, n_add), 2)} |"
        )
        for key, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms")):
            lines.append(
                f"| 4 (same rate) | {label} (direct {fmt(med(s['direct_at_edge_rate'], key), 3)}) "
                f"| {fmt(med(s['edgeproxy'], key), 3)} | {fmt(med(s['nginx'], key), 3)} | "
                f"{fmt(ratio(med(s['edgeproxy'], key), med(s['nginx'], key)), 2)} |"
            )
        lines.append(
            f"| 4 (same rate) | proxy worker CPU (cores) | "
            f"{fmt(med(s['edgeproxy'], 'worker_util'), 2)} | "
            f"{fmt(med(s['nginx'], 'worker_util'), 2)} | "
            f"{fmt(ratio(med(s['edgeproxy'], 'worker_util'), med(s['nginx'], 'worker_util')), 2)} |"
        )
        if s.get("nginx_own"):
            n_own = med(s["nginx_own"], "p99_ms") - med(s["direct_at_nginx_rate"], "p99_ms")
            lines.append(
                f"| 4 nginx at {fmt(s['nginx_rate'])} req/s (½ its saturation) | p99 ms added "
                f"| — | {fmt(n_own, 3)} | — |"
            )
    if "workers2" in sc:
        s = sc["workers2"]
        for key, label, d in (
            ("per_cpu_s", "req per proxy CPU-s", 0),
            ("rps", "req/s", 0),
            ("p99_ms", "p99 ms", 3),
            ("worker_util", "worker CPU (cores)", 2),
        ):
            for who, k2, k1 in (
                ("edgeproxy", "workers2", "workers1"),
                ("nginx (reference)", "nginx_workers2", "nginx_workers1"),
            ):
                w2, w1 = med(s.get(k2, []), key), med(s.get(k1, []), key)
                lines.append(
                    f"| 5 {who}: 2 workers \\| 1 worker \\| 2w/1w | {label} | {fmt(w2, d)} | "
                    f"{fmt(w1, d)} | {fmt(ratio(w2, w1), 2)} |"
                )
    lines.append("")
    if sc.get("keepalive", {}).get("relay"):
        lines += [
            "### A bare relay on uvloop's TLS (bench/relay.py)",
            "",
            "Same rounds, same load. The relay parses no HTTP and does none of edgeproxy's work,"
            " on uvloop's TLS (memory BIOs, not compiled): the ceiling of the stack edgeproxy "
            "ran on until session 4, which now serves TLS from the socket, compiled "
            "(edgeproxy/tls/transport.py). (In 2/3 it also opens an upstream "
            "connection per client connection, which edgeproxy pools.)",
            "",
            "| scenario | relay per proxy CPU-s | relay/nginx | edgeproxy/relay |",
            "|---|---:|---:|---:|",
        ]
        for key, title in (
            ("keepalive", "1 keep-alive beacons"),
            ("full_handshake", "2 full RSA handshakes"),
            ("resumed_handshake", "3 resumed handshakes"),
        ):
            if key not in sc:
                continue
            r, e, n = (med(sc[key][k], "per_cpu_s") for k in ("relay", "edgeproxy", "nginx"))
            lines.append(f"| {title} | {fmt(r)} | {fmt(ratio(r, n), 2)} | {fmt(ratio(e, r), 2)} |")
        lines.append("")
    if "keepalive" in sc:
        other = med(sc["keepalive"]["edgeproxy"], "other_cpu_s")
        lines += [
            f"edgeproxy's supervisor + control process used {fmt(other, 3)} CPU-s per "
            f"{a['seconds']:g} s keep-alive run (median), excluded from the per-CPU-s figures "
            "above (they serve no traffic).",
            "",
        ]
    if "full_handshake" in sc or "resumed_handshake" in sc:
        lines += ["### Resumption proof (client side, every connection's `session_reused`)", ""]
        lines.append(
            "| scenario | server | connections | full | resumed | offered a session | errors |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for name in ("full_handshake", "resumed_handshake"):
            for srv in ("edgeproxy", "nginx"):
                if name not in sc:
                    continue
                c: Counter[str] = Counter()
                for r in sc[name][srv]:
                    c.update(r["stats"])
                errs = sum(v for k, v in c.items() if k.startswith(("error", "status_")))
                lines.append(
                    f"| {name} | {srv} | {c['full'] + c['resumed']:,} | {c['full']:,} | "
                    f"{c['resumed']:,} | {c['offered_session']:,} | {errs} |"
                )
        vers: Counter[str] = Counter()
        for name in ("full_handshake", "resumed_handshake"):
            for srv in ("edgeproxy", "nginx"):
                for r in sc.get(name, {}).get(srv, []):
                    vers.update(r["versions"])
        lines += ["", f"Negotiated: {dict(vers)}.", ""]
    if "cross_worker" in sc:
        lines += [
            "### 6. Session resumption across workers (2 workers, SO_REUSEPORT)",
            "",
            "| server | connections offering a ticket | resumed | on the ticket's worker "
            "(resumed) | on the other worker (resumed) |",
            "|---|---:|---:|---:|---:|",
        ]
        for srv, r in sc["cross_worker"].items():
            lines.append(
                f"| {srv} | {r['connections']} | {r['resumed']} ({r['resumed_fraction']:.1%}) | "
                f"{r['same_worker']} ({r['same_worker_resumed']}) | "
                f"{r['other_worker']} ({r['other_worker_resumed']}) |"
            )
        lines.append("")
    lines += ["### Errors and health", ""]
    for k, v in res.get("health", {}).items():
        lines.append(f"- {k}: {json.dumps(v)}")
    lines += ["", "### Method notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def setup(work: Path) -> Path:
    root = make_ca("edgeproxy bench root CA")
    inter = make_intermediate(root, "edgeproxy bench intermediate CA")
    leaf, key = issue_leaf(inter, HOST)  # RSA 2048 leaf + intermediate
    write_bundle(work / "certs", HOST, leaf, key, [inter.cert])
    (work / "ca.pem").write_bytes(pem(root.cert))
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(BEACON.decode())}\n"
    )
    return script


def build_openloop(work: Path) -> None:
    """Scenario 4's client (bench/openloop.c) and the request it sends."""
    (work / "beacon.http").write_bytes(request(close=False))
    source = ROOT / "bench" / "openloop.c"
    cmd = ["gcc", "-O2", "-o", str(work / "openloop"), str(source), "-lssl", "-lcrypto"]
    subprocess.run(cmd, check=True)


@contextlib.contextmanager
def servers(work: Path, profile_only: bool) -> Iterator[dict[str, dict[str, Any]]]:
    certs = work / "certs"
    s: dict[str, dict[str, Any]] = {}
    try:
        s["upstream"] = start_upstream(work)
        s["edge1"] = start_edge(work, "edge1", EDGE1_PORT, EDGE1_METRICS, 1)
        if not profile_only:
            s["nginx1"] = start_nginx(work, "nginx1", 1, tls_proxy_body(NGINX1_PORT, certs, False))
            s["edge2"] = start_edge(work, "edge2", EDGE2_PORT, EDGE2_METRICS, 2)
            s["nginx2"] = start_nginx(work, "nginx2", 2, tls_proxy_body(NGINX2_PORT, certs, True))
            s["relay"] = start_relay(work)
        yield s
    finally:
        cleanup()


def bench(args: argparse.Namespace, work: Path, script: Path) -> dict[str, Any]:
    res: dict[str, Any] = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "args": vars(args),
        "machine": machine(),
        "scenarios": {},
        "notes": [],
        "health": {},
    }
    sc = res["scenarios"]
    with servers(work, False) as s:
        e1, e2, n1, n2, relay = s["edge1"], s["edge2"], s["nginx1"], s["nginx2"], s["relay"]
        # Scenarios 1-3 run edgeproxy, nginx and the bare relay in turn (A B C A B C ...).
        trio = (
            ("edgeproxy", e1, EDGE1_PORT),
            ("nginx", n1, NGINX1_PORT),
            ("relay", relay, RELAY_PORT),
        )
        res["chain_check"] = {
            "edgeproxy": verify_chain(EDGE1_PORT, work / "ca.pem"),
            "nginx": verify_chain(NGINX1_PORT, work / "ca.pem"),
        }
        log(f"chain verified: {res['chain_check']}")
        for port in (EDGE1_PORT, NGINX1_PORT, EDGE2_PORT, RELAY_PORT):  # warm-up, not recorded
            wrk(f"https://{HOST}:{port}/track", 2, args.connections, script)

        log("1. keep-alive beacons")
        ka: dict[str, list[dict[str, Any]]] = {"edgeproxy": [], "nginx": [], "relay": []}
        for i in range(args.rounds):
            for name, srv, port in trio:
                ka[name].append(keepalive_run(srv, port, args, script))
                log(f"  round {i + 1} {name}: {ka[name][-1]['rps']:.0f} req/s")
        sc["keepalive"] = ka

        for key, resume, title in (
            ("full_handshake", False, "2. full handshakes"),
            ("resumed_handshake", True, "3. resumed handshakes"),
        ):
            log(title)
            hs: dict[str, list[dict[str, Any]]] = {"edgeproxy": [], "nginx": [], "relay": []}
            for i in range(args.rounds):
                for name, srv, port in trio:
                    hs[name].append(handshake_run(srv, port, args, resume))
                    r = hs[name][-1]
                    log(f"  round {i + 1} {name}: {r['rps']:.0f} hs/s {r['stats']}")
            sc[key] = hs

        log("4. latency at half saturation")
        build_openloop(work)
        e_rate = med(ka["edgeproxy"], "rps") / 2
        n_rate = med(ka["nginx"], "rps") / 2
        lat: dict[str, Any] = {
            "rate": e_rate,
            "nginx_rate": n_rate,
            "direct_at_edge_rate": [],
            "edgeproxy": [],
            "nginx": [],
            "direct_at_nginx_rate": [],
            "nginx_own": [],
        }
        with pinned([e1, n1], [s["upstream"]]) as lat["pinned"]:
            for i in range(args.rounds):
                lat["direct_at_edge_rate"].append(
                    rate_run(work, None, UPSTREAM_PORT, False, e_rate, args)
                )
                lat["edgeproxy"].append(rate_run(work, e1, EDGE1_PORT, True, e_rate, args))
                lat["nginx"].append(rate_run(work, n1, NGINX1_PORT, True, e_rate, args))
                if not args.smoke:
                    lat["direct_at_nginx_rate"].append(
                        rate_run(work, None, UPSTREAM_PORT, False, n_rate, args)
                    )
                    lat["nginx_own"].append(rate_run(work, n1, NGINX1_PORT, True, n_rate, args))
                log(
                    f"  round {i + 1}: p99 direct "
                    f"{lat['direct_at_edge_rate'][-1]['p99_ms']:.3f} "
                    f"edge {lat['edgeproxy'][-1]['p99_ms']:.3f} "
                    f"nginx {lat['nginx'][-1]['p99_ms']:.3f} ms at {e_rate:.0f}/s"
                )
        sc["latency_at_half"] = lat

        log("5. 2 workers vs 1 worker (keep-alive; nginx alongside for reference)")
        w: dict[str, list[dict[str, Any]]] = {
            "workers1": [],
            "workers2": [],
            "nginx_workers1": [],
            "nginx_workers2": [],
        }
        for i in range(args.rounds):
            for name, srv, port in (
                ("workers1", e1, EDGE1_PORT),
                ("workers2", e2, EDGE2_PORT),
                ("nginx_workers1", n1, NGINX1_PORT),
                ("nginx_workers2", n2, NGINX2_PORT),
            ):
                w[name].append(keepalive_run(srv, port, args, script))
                log(f"  round {i + 1} {name}: {w[name][-1]['rps']:.0f} req/s")
        sc["workers2"] = w

        log("6. resumption across workers")
        sc["cross_worker"] = {
            "edgeproxy (2 workers)": cross_worker(
                EDGE2_PORT, e2["workers"], args.xw_trials, args.xw_per_trial
            ),
            "nginx (2 workers, reuseport)": cross_worker(
                NGINX2_PORT, n2["workers"], args.xw_trials, args.xw_per_trial
            ),
        }
        log(f"  {sc['cross_worker']}")

        res["health"] = {
            "edge1 metrics (totals)": edge_metrics(EDGE1_METRICS),
            "edge2 metrics (totals)": edge_metrics(EDGE2_METRICS),
            "edge1 alive, workers unchanged": e1["proc"].poll() is None
            and sorted(children(e1["proc"].pid)) == sorted(e1["workers"] + e1["other"][1:]),
            "edge2 alive, workers unchanged": e2["proc"].poll() is None
            and sorted(children(e2["proc"].pid)) == sorted(e2["workers"] + e2["other"][1:]),
        }
    for name in ("edge1", "edge2"):
        res["health"][f"{name} stderr"] = stderr_summary(work / f"{name}-stderr.log")
    for name in ("upstream", "nginx1", "nginx2"):
        errlog = work / f"{name}-error.log"
        text = errlog.read_text(errors="replace") if errlog.exists() else ""
        res["health"][f"{name} error.log"] = text.splitlines()[-5:]
    errs = {
        f"{k} {srv}": [r["socket_errors"] for r in v] + [r["non_2xx"] for r in v]
        for k in ("keepalive", "workers2")
        for srv, v in sc[k].items()
    }
    res["health"]["wrk socket errors [connect,read,write,timeout] / non-2xx"] = errs
    res["health"]["rate-client stats"] = {
        k: [r["stats"] for r in v] for k, v in sc["latency_at_half"].items() if isinstance(v, list)
    }
    res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    res["notes"] = [
        f"1/5: `wrk -t1 -c{args.connections} -d{args.seconds}s --latency -s post.lua "
        f"https://{HOST}:PORT/track`, a {len(BEACON)}-byte JSON POST (TLS 1.3, keep-alive).",
        f"2/3: {args.hs_procs} client processes (Python ssl, blocking sockets), each in a loop: "
        "connect, TLS handshake, one POST with `Connection: close`, read the 204 (latency "
        "stops), wait for the server's close. Scenario 2 never passes a session (OpenSSL "
        "offers no PSK); 3 passes the newest session (TLS 1.3 ticket) each time; "
        "`SSLSocket.session_reused` is counted on every connection. Throughput here is bound "
        "by the Python client on this small machine (see worker CPU), per-CPU-s is not.",
        "4: open-loop client (bench/openloop.c, C and OpenSSL, one process): requests are due "
        "at a fixed rate (half the median wrk req/s of scenario 1), sent on the next idle one "
        "of 8 keep-alive connections per 2,500 req/s; latency = response complete - due "
        "time, so a request that waits for a connection counts its wait (as wrk2's "
        "coordinated-omission correction). 'direct' is the same client in plain HTTP to the "
        "upstream at the same rate; added = proxy - direct. Pinned: the proxy's worker alone "
        "on CPU 0, the client and the upstream on CPU 1, for both proxies (unpinned, the "
        "client's CPU time became the proxy's queueing). Until session 6 the client was "
        "Python (7 processes at 15.7k req/s): it kept CPU 1 ~80% busy with TLS and delayed "
        "its own sends by up to 23 ms, which counted as latency the proxy added. "
        "'proxy worker CPU' is the worker's utilization at that rate: "
        "open-loop requests arrive a few at a time, so a request costs more than in wrk's "
        "saturated batches and half of wrk's rate is more than half of a core.",
        "5: the same wrk command against an edge with `workers = 2` (SO_REUSEPORT); on this "
        f"{res['machine']['nproc']}-CPU machine wrk, the upstream and 2 workers share the cores.",
        f"6: {args.xw_trials} trials: one full handshake + request yields a ticket; "
        f"{args.xw_per_trial} new connections offer it; all held open, then each accepted "
        "socket's owner is found from /proc/net/tcp inode -> /proc/<worker>/fd.",
        "Edge stderr is at level error; access log off. Expected noise in the edge's "
        "counters: wrk opens and closes one plain TCP connection before its run (address "
        "probe) = 1 handshake `error` per wrk run, and requests in flight when wrk stops are "
        "counted as 499 (4xx).",
    ]
    return res


def profile(args: argparse.Namespace, work: Path, script: Path) -> None:
    if not PYSPY.exists():
        raise SystemExit(
            f"{PYSPY} missing: python3 -m venv /tmp/pyspy-venv && "
            "/tmp/pyspy-venv/bin/pip install py-spy"
        )
    raw = Path("/tmp/edgeproxy-pyspy-raw.txt")
    dur = args.profile_seconds
    with servers(work, True) as s:
        pid = s["edge1"]["workers"][0]
        wrk(f"https://{HOST}:{EDGE1_PORT}/track", 2, args.connections, script)
        cmd = [
            "wrk",
            "-t1",
            f"-c{args.connections}",
            f"-d{dur + 10}s",
            "-s",
            str(script),
            f"https://{HOST}:{EDGE1_PORT}/track",
        ]
        load = spawn(cmd, work / "wrk-profile.log")
        time.sleep(2)
        spy = [
            str(PYSPY),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(dur),
            "--rate",
            "200",
            "--format",
            "raw",
            "--function",
            "-o",
            str(raw),
        ]
        if args.native:
            spy.insert(2, "--native")
        p = subprocess.run(spy, capture_output=True, text=True, timeout=dur + 60, check=False)
        load.wait(dur + 30)
        if p.returncode != 0:
            raise SystemExit(f"py-spy failed: {p.stderr[-2000:]}")
    own: Counter[str] = Counter()
    tot: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            tot[f] += count
    text = [
        f"py-spy {'--native ' if args.native else ''}record --function --rate 200, "
        f"{dur} s, worker pid {pid}, under `{' '.join(cmd)}`; {samples} samples "
        "(idle excluded)",
        "",
    ]
    for title, c in (("own time", own), ("total time", tot)):
        text += [
            f"### top 25 by {title}",
            "",
            "| % | samples | function (file:line) |",
            "|---:|---:|---|",
        ]
        for f, count in c.most_common(25):
            text.append(f"| {100 * count / max(1, samples):.1f} | {count} | `{f}` |")
        text.append("")
    if args.native:  # which Python code the syscalls / C leaves come from
        callers: Counter[tuple[str, str]] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            if not stack or ".py:" in frames[-1]:
                continue
            py = next((f for f in reversed(frames) if ".py:" in f), "?")
            callers[(frames[-1], py)] += int(n)
        text += [
            "### native leaves by nearest Python caller (top 15)",
            "",
            "| % | native leaf | Python caller |",
            "|---:|---|---|",
        ]
        for (leaf, py), count in callers.most_common(15):
            text.append(f"| {100 * count / max(1, samples):.1f} | `{leaf}` | `{py}` |")
        text.append("")
    stem = "profile_native" if args.native else "profile"
    OUT.mkdir(exist_ok=True)
    (OUT / f"{stem}.md").write_text("\n".join(text))
    shutil.copy(raw, OUT / f"{stem}.txt")
    print("\n".join(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="< 60 s proof that the script works")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections")
    ap.add_argument("--hs-procs", type=int, default=4, help="handshake client processes")
    ap.add_argument("--xw-trials", type=int, default=30)
    ap.add_argument("--xw-per-trial", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="only: py-spy one edgeproxy worker")
    ap.add_argument("--profile-seconds", type=int, default=15)
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.seconds, args.xw_trials, args.xw_per_trial = 1, 2, 5, 6
    ensure_tools()
    ports = [UPSTREAM_PORT, EDGE1_PORT, EDGE2_PORT, NGINX1_PORT, NGINX2_PORT, RELAY_PORT]
    if not ports_free(LOOP, [*ports, EDGE1_METRICS, EDGE2_METRICS]):
        return 1
    interrupt_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-run-"))
    t0 = time.monotonic()
    try:
        script = setup(work)
        if args.profile:
            profile(args, work, script)
            return 0
        res = bench(args, work, script)
        res["total_s"] = round(time.monotonic() - t0, 1)
        stem = "run_smoke" if args.smoke else "run"
        OUT.mkdir(exist_ok=True)
        (OUT / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
        report = render(res)
        (OUT / f"{stem}.md").write_text(report)
        print(report)
        log(f"total {res['total_s']} s; wrote {OUT / stem}.md/.json")
        return 0
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    finally:
        cleanup()
