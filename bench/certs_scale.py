"""Certificate scale: edgeproxy against nginx with 1k / 10k / 100k customer certificates.

Measures, on loopback only:
1. edgeproxy first start (empty state: every bundle validated) to /readyz 200, and the RSS of
   every edge process at ready and after 1000 handshakes over random domains;
2. edgeproxy restart (state kept) to /readyz 200, same RSS figures;
3. nginx with one server block per domain: start to a handshake for the last domain, RSS;
4. certificate swap latency (write -> new leaf served) on 1000 domains, edgeproxy (hot
   reload) and nginx (`nginx -s reload`), with a background handshake loop on another domain;
5. handshakes/s against edgeproxy's context cache, cold (never-seen domains) vs warm.

Run: `.venv/bin/python bench/certs_scale.py` (all sizes, ~20-35 min the first time: the
certificates are generated once and cached in bench/out/certs_scale/), `--quick` for a smoke
run (N=50, < 60 s, writes certs_scale_quick.*), `--sizes 1000,10000` for a subset,
`--profile-control 10000` for a cProfile of the control process's first-start sync (same
code, run in this process).
Writes bench/out/certs_scale.{md,json}. Needs Debian's nginx. Not part of the test suite.

Certificates: RSA 2048 leaf + intermediate under a private root (certs.trust_bundle). Keys
come from a pool of 200 shared across domains (a key costs ~50 ms to make; the edge accepts
a shared key on disk with a warning); every domain gets its own leaf certificate.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    cleanup,
    forked,
    interrupt_on_sigterm,
    log,
    nginx_bin,
    ports_free,
    spawn,
    stop,
    tree,
)
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from edgeproxy.demo import (  # noqa: E402
    Issuer,
    issue_leaf,
    key_pem,
    make_ca,
    make_intermediate,
    pem,
    write_bundle,
)

OUT = ROOT / "bench" / "out"
CACHE = OUT / "certs_scale"  # generated PKI, certificate pool, per-size sets, run folders
HOST = "127.0.0.1"
EDGE_PORT, METRICS_PORT, NGINX_PORT, DEAD_UPSTREAM_PORT = 28443, 29100, 28444, 28081
KEY_POOL = 200
LEAF_DAYS = 397
SWAP_N = 1000
THROUGHPUT_N = 10000
NGINX_BUDGET_S = 180.0

# ---------------------------------------------------------------------------------------------
# processes: everything started here is tracked and killed (by its own process group) at exit


def _status_kb(pid: int, key: str, file: str = "status") -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def memory(pids: list[int], roles: dict[int, str] | None = None) -> dict[str, Any]:
    """Sum of VmRSS (what was asked) and of Pss (shared pages counted once) in MB."""
    per = {
        (roles or {}).get(pid, str(pid)): round(_status_kb(pid, "VmRSS") / 1024, 1) for pid in pids
    }
    return {
        "rss_mb": round(sum(_status_kb(p, "VmRSS") for p in pids) / 1024, 1),
        "pss_mb": round(sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids) / 1024, 1),
        "per_process_rss_mb": per,
    }


# ---------------------------------------------------------------------------------------------
# certificates: a root, an intermediate, a pool of keys, one leaf per domain (cached on disk)


def domain(i: int) -> str:
    return f"d{i:06d}.scale.bench.test"


def _default_signals() -> None:
    """Pool workers are forked from main(): they must die quietly on the pool's SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _new_key_pem(_: int) -> bytes:
    return key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _load_key(data: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(
        data, password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _split_pem(data: bytes, marker: bytes) -> list[bytes]:
    return [marker + b for b in data.split(marker)[1:]]


def load_or_make_pki(pki: Path) -> tuple[Issuer, Issuer, list[rsa.RSAPrivateKey]]:
    files = [pki / n for n in ("root.pem", "root.key", "inter.pem", "inter.key", "keys.pem")]
    if not all(f.exists() for f in files):
        shutil.rmtree(CACHE / "pool", ignore_errors=True)  # leaves of an older PKI
        shutil.rmtree(CACHE / "sets", ignore_errors=True)
        pki.mkdir(parents=True, exist_ok=True)
        root = make_ca("edgeproxy bench root CA")
        inter = make_intermediate(root, "edgeproxy bench intermediate CA")
        with mp.get_context("fork").Pool(os.cpu_count() or 1, _default_signals) as pool:
            keys = pool.map(_new_key_pem, range(KEY_POOL))
        for f, data in zip(
            files,
            (
                pem(root.cert),
                key_pem(root.key),
                pem(inter.cert),
                key_pem(inter.key),
                b"".join(keys),
            ),
            strict=True,
        ):
            f.write_bytes(data)
    root = Issuer(
        x509.load_pem_x509_certificate(files[0].read_bytes()), _load_key(files[1].read_bytes())
    )
    inter = Issuer(
        x509.load_pem_x509_certificate(files[2].read_bytes()), _load_key(files[3].read_bytes())
    )
    leaf_keys = [
        _load_key(b) for b in _split_pem(files[4].read_bytes(), b"-----BEGIN PRIVATE KEY-----")
    ]
    return root, inter, leaf_keys


_GEN: dict[str, Any] = {}  # inherited by the forked generator processes


def _gen_chunk(bounds: tuple[int, int]) -> int:
    inter, keys, pool = _GEN["inter"], _GEN["keys"], _GEN["pool"]
    for i in range(*bounds):
        leaf, key = issue_leaf(inter, domain(i), days=LEAF_DAYS, key=keys[i % len(keys)])
        write_bundle(pool, domain(i), leaf, key, [inter.cert])
    return bounds[1] - bounds[0]


def ensure_pool(n: int, inter: Issuer, keys: list[rsa.RSAPrivateKey]) -> float:
    """Bundles for domains 0..n-1 in CACHE/pool (incremental). Returns seconds spent."""
    pool = CACHE / "pool"
    meta = CACHE / "pool.json"
    have = 0
    if meta.exists():
        doc = json.loads(meta.read_text())
        if time.time() - doc["created"] < (LEAF_DAYS - 90) * 86400:
            have = doc["count"]
        else:
            shutil.rmtree(pool, ignore_errors=True)
            shutil.rmtree(CACHE / "sets", ignore_errors=True)
    if have >= n:
        return 0.0
    created = json.loads(meta.read_text())["created"] if have else time.time()
    t0 = time.perf_counter()
    pool.mkdir(parents=True, exist_ok=True)
    _GEN.update(inter=inter, keys=keys, pool=pool)
    chunks = [(s, min(s + 1000, n)) for s in range(have, n, 1000)]
    done = have
    with mp.get_context("fork").Pool(os.cpu_count() or 1, _default_signals) as workers:
        for k in workers.imap_unordered(_gen_chunk, chunks):
            done += k
            if done % 10000 < 1000 or done == n:
                log(f"  generated {done}/{n} bundles ({time.perf_counter() - t0:.0f} s)")
    meta.write_text(json.dumps({"count": n, "created": created}))
    return time.perf_counter() - t0


TRASH = CACHE / "trash"


def discard(path: Path) -> None:
    """Move `path` aside, to be deleted when the run ends (empty_trash).

    This VM's root filesystem (ext4 without a journal) skips the inodes freed in the last
    ~30 s when it allocates new ones, and pays for every one it skips: 10k files deleted
    right before a first start made that start's 10k new served files cost 3.3 s more
    (10.1 vs 6.8 s). A rename frees nothing.
    """
    if path.exists():
        TRASH.mkdir(parents=True, exist_ok=True)
        path.rename(TRASH / f"{time.monotonic_ns()}-{path.name}")


def empty_trash() -> None:
    shutil.rmtree(TRASH, ignore_errors=True)


def link_set(n: int, dest: Path) -> Path:
    """dest/<domain>/{fullchain,privkey}.pem for domains 0..n-1, hard links into the pool."""
    pool = CACHE / "pool"
    dest.mkdir(parents=True)
    for i in range(n):
        d = domain(i)
        (dest / d).mkdir(mode=0o700)
        for f in ("fullchain.pem", "privkey.pem"):
            os.link(pool / d / f, dest / d / f)
    return dest


def ensure_set(n: int) -> Path:
    base = CACHE / "sets" / str(n)
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        link_set(n, base / "certs")
        (base / ".complete").write_text(str(n))
    return base / "certs"


# ---------------------------------------------------------------------------------------------
# clients


def client_ctx(root_pem: Path, *, verify: bool = True) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context(cafile=str(root_pem))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def handshake(ctx: ssl.SSLContext, port: int, name: str, timeout: float = 5.0) -> bytes:
    """One full handshake (no session reuse: no session is ever passed); the leaf's DER."""
    with (
        socket.create_connection((HOST, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def sha(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def random_handshakes(
    ctx: ssl.SSLContext, port: int, n: int, count: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    picks = [rng.randrange(n) for _ in range(count)]
    ok, errors = 0, Counter[str]()
    t0 = time.perf_counter()
    for i in picks:
        try:
            handshake(ctx, port, domain(i))
            ok += 1
        except (OSError, ssl.SSLError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
    took = time.perf_counter() - t0
    return {
        "ok": ok,
        "failed": count - ok,
        "errors": dict(errors.most_common(3)),
        "seconds": round(took, 2),
        "used": sorted(set(picks)),
    }


def _bg_loop(port: int, root_pem: str, name: str, stop_evt: Any, out: str, limit_s: float) -> None:
    ctx = client_ctx(Path(root_pem))
    ok, errors, certs = 0, Counter[str](), Counter[str]()
    end = time.monotonic() + limit_s
    while not stop_evt.is_set() and time.monotonic() < end:
        try:
            certs[sha(handshake(ctx, port, name))[:16]] += 1
            ok += 1
        except (OSError, ssl.SSLError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
    Path(out).write_text(
        json.dumps(
            {"ok": ok, "failed": sum(errors.values()), "errors": dict(errors), "certs": certs}
        )
    )


@contextmanager
def background_handshakes(
    port: int, root_pem: Path, name: str, out: Path
) -> Iterator[dict[str, Any]]:
    """A separate process handshaking with `name` in a loop; the dict is filled on exit."""
    fork = mp.get_context("fork")
    stop_evt = fork.Event()
    proc = fork.Process(target=_bg_loop, args=(port, str(root_pem), name, stop_evt, str(out), 600))
    proc.start()
    forked.append(proc)
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        stop_evt.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        forked.remove(proc)
        with suppress(OSError, ValueError):
            result.update(json.loads(out.read_text()))


def http_get(path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{METRICS_PORT}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(body: bytes, prefix: str) -> float | None:
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def served_count(state: Path) -> int:
    try:
        return sum(
            1
            for e in os.scandir(state / "served")
            if e.name.endswith(".pem") and not e.name.startswith(".")
        )
    except FileNotFoundError:
        return 0


def stderr_summary(path: Path, since: int = 0) -> dict[str, Any]:
    """Lines the edge wrote to stderr after byte `since`, grouped by level and message."""
    try:
        data = path.read_bytes()[since:]
    except FileNotFoundError:
        return {"lines": 0}
    levels, msgs = Counter[str](), Counter[str]()
    lines = data.decode(errors="replace").splitlines()
    for line in lines:
        try:
            doc = json.loads(line)
            levels[doc.get("level", "?")] += 1
            msgs[f"{doc.get('level')}: {str(doc.get('msg'))[:120]}"] += 1
        except ValueError:
            levels["non-json"] += 1
            msgs[f"raw: {line[:120]}"] += 1
    return {"lines": len(lines), "levels": dict(levels), "top": dict(msgs.most_common(5))}


# ---------------------------------------------------------------------------------------------
# edgeproxy


def edge_config(run: Path, certs: Path, state: Path, root_pem: Path, workers: int) -> Path:
    config = run / "edge.toml"
    config.write_text(f"""
[server]
listen = ["{HOST}:{EDGE_PORT}"]
workers = {workers}
[certs]
dir = "{certs}"
trust_bundle = "{root_pem}"
state_dir = "{state}"
[routes]
"/track" = ["http://{HOST}:{DEAD_UPSTREAM_PORT}"]
[proxy]
long_lived_routes = []
[metrics]
listen = "{HOST}:{METRICS_PORT}"
[admin]
listen = ""
[log]
level = "error"
access = false
""")
    return config


def start_edge(config: Path, stderr_file: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    cmd = [sys.executable, "-m", "edgeproxy", "serve", "--config", str(config)]
    return spawn(cmd, stderr_file, cwd=ROOT, env=env)


def code_version() -> dict[str, Any]:
    """What edgeproxy code a run used: HEAD, dirty files, a hash of every source file (the
    tree may change between runs while someone else edits it)."""
    digest = hashlib.sha256()
    for f in sorted((ROOT / "edgeproxy").rglob("*.py")):
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--porcelain", "--", "edgeproxy").splitlines(),
        "source_sha256": digest.hexdigest()[:12],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def edge_roles(p: subprocess.Popen[bytes]) -> dict[int, str]:
    roles = {p.pid: "supervisor"}
    with suppress(OSError, ValueError, KeyError):
        roles[json.loads(http_get("/healthz")[1])["pid"]] = "control"
    for i, pid in enumerate(x for x in tree(p.pid) if x not in roles):
        roles[pid] = f"worker{i}"
    return roles


def fit_extrapolation(samples: list[tuple[float, int]], n: int) -> dict[str, Any]:
    """Per-domain cost as a linear function of domains already validated (least squares over
    sampling windows), integrated from the last sample to n."""
    pts = [
        ((k0 + k1) / 2, (t1 - t0) / (k1 - k0))
        for (t0, k0), (t1, k1) in zip(samples, samples[1:], strict=False)
        if k1 > k0
    ]
    t_last, k_last = samples[-1]
    if len(pts) < 3:
        return {"note": "too few samples"}
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    beta = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    alpha = my - beta * mx
    rest = alpha * (n - k_last) + beta * (n * n - k_last * k_last) / 2
    return {
        "ms_per_domain_at_start": round(alpha * 1000, 3),
        "ms_per_domain_added_per_1000_loaded": round(beta * 1000 * 1000, 4),
        "ms_per_domain_at_n": round((alpha + beta * n) * 1000, 3),
        "validated_at_stop": k_last,
        "seconds_at_stop": round(t_last, 1),
        "predicted_total_s": round(t_last + rest, 0),
    }


def edge_run(
    n: int,
    certs: Path,
    run: Path,
    root_pem: Path,
    *,
    fresh: bool,
    workers: int,
    budget_s: float,
    handshakes: int,
    throughput: Callable[[Path, set[int]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start the edge on `certs` (fresh state or kept), time /readyz, measure RSS."""
    state = run / "state"
    if fresh:
        discard(state)
    config = edge_config(run, certs, state, root_pem, workers)
    errfile = run / "edge.stderr"
    since = errfile.stat().st_size if errfile.exists() else 0
    res: dict[str, Any] = {"n": n, "mode": "first start" if fresh else "restart"}
    res["code"] = code_version()
    samples: list[tuple[float, int]] = []
    rss_samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    p = start_edge(config, errfile)
    try:
        ready = None
        next_sample = 0.0
        doc: dict[str, Any] = {}
        while time.perf_counter() - t0 < budget_s and p.poll() is None:
            with suppress(OSError):
                status, body = http_get("/readyz", timeout=10)
                doc = json.loads(body)
                if status == 200:
                    ready = time.perf_counter() - t0
                    break
            now = time.perf_counter() - t0
            if now >= next_sample:
                samples.append((now, served_count(state)))
                rss_samples.append((now, memory(tree(p.pid))["rss_mb"]))
                if n >= 10000 and len(samples) % 15 == 0:
                    log(
                        f"    {now:.0f} s: {samples[-1][1]}/{n} served, RSS {rss_samples[-1][1]} MB"
                    )
                next_sample = now + 2.0
            time.sleep(0.2)
        res["exit_code_during_start"] = p.poll()
        res["last_readyz"] = doc
        if ready is None:
            samples.append((time.perf_counter() - t0, served_count(state)))
            res["ready_s"] = None
            res["budget_s"] = budget_s
            res["extrapolation"] = fit_extrapolation(samples, n)
            res["rss_at_stop"] = memory(tree(p.pid), edge_roles(p))
            res["rss_samples"] = rss_samples[:: max(1, len(rss_samples) // 20)]
            return res
        res["ready_s"] = round(ready, 3)
        t1 = time.perf_counter()
        http_get("/readyz", timeout=30)
        res["readyz_latency_ms"] = round((time.perf_counter() - t1) * 1000, 1)
        body = http_get("/metrics", timeout=60)[1]
        res["metrics_bytes"] = len(body)
        res["reloads_loaded"] = metric(body, 'edgeproxy_cert_reloads_total{result="loaded"}')
        res["reloads_rejected"] = metric(body, 'edgeproxy_cert_reloads_total{result="rejected"}')
        roles = edge_roles(p)
        res["rss_ready"] = memory(list(roles), roles)
        ctx = client_ctx(root_pem)
        hs = random_handshakes(ctx, EDGE_PORT, n, handshakes, seed=n)
        used = set(hs.pop("used"))
        res["handshakes"] = hs
        res["rss_after_handshakes"] = memory(list(roles), roles)
        # Ready comes before the reconcile with the certificates folder at a restart (the
        # last run's bundles are served at once): report the memory once that is done too.
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            with suppress(OSError, ValueError):
                if json.loads(http_get("/readyz", timeout=10)[1]).get("certificates_synced"):
                    res["synced_s"] = round(time.perf_counter() - t0, 3)
                    break
            time.sleep(0.2)
        res["rss_synced"] = memory(list(roles), roles)
        if throughput is not None:
            res["throughput"] = throughput(root_pem, used)
            res["rss_after_throughput"] = memory(list(roles), roles)
        index = state / "index.json"
        time.sleep(2.5)  # the registry saves its index 2 s after a batch of changes
        res["index_mb_before_stop"] = round(index.stat().st_size / 1e6, 3) if index.exists() else 0
        return res
    finally:
        res["stop_s"] = round(stop(p), 2)
        index = state / "index.json"
        res["index_mb_after_stop"] = round(index.stat().st_size / 1e6, 3) if index.exists() else 0
        res["stderr"] = stderr_summary(errfile, since)


def throughput_test(
    n: int, rounds: int, per_round: int, warm_domains: int
) -> Callable[[Path, set[int]], dict[str, Any]]:
    def run(root_pem: Path, used: set[int]) -> dict[str, Any]:
        ctx = client_ctx(root_pem, verify=False)  # the client's own CPU goes to the edge's side
        rng = random.Random(7)
        unused = [i for i in range(n) if i not in used]
        rng.shuffle(unused)
        warm = sorted(used)[:warm_domains] or unused[-warm_domains:]
        for i in warm:  # prime the warm set (not timed)
            handshake(ctx, EDGE_PORT, domain(i))
        count = min(per_round, max(1, (len(unused) - len(warm)) // rounds))
        out: dict[str, list[float]] = {"cold": [], "warm": []}
        failed = 0
        for r in range(rounds):
            for kind in ("cold", "warm"):
                if kind == "cold":
                    names = [domain(i) for i in unused[r * count : (r + 1) * count]]
                else:
                    names = [domain(warm[rng.randrange(len(warm))]) for _ in range(count)]
                t0 = time.perf_counter()
                for name in names:
                    try:
                        handshake(ctx, EDGE_PORT, name)
                    except (OSError, ssl.SSLError):
                        failed += 1
                out[kind].append(round(len(names) / (time.perf_counter() - t0), 1))
        return {
            "domains": n,
            "rounds": rounds,
            "handshakes_per_round": count,
            "warm_domains": len(warm),
            "cold_hs_per_s": statistics.median(out["cold"]),
            "warm_hs_per_s": statistics.median(out["warm"]),
            "cold_rounds": out["cold"],
            "warm_rounds": out["warm"],
            "failed": failed,
        }

    return run


def new_bundle(
    inter: Issuer, keys: list[rsa.RSAPrivateKey], i: int, rep: int
) -> tuple[bytes, bytes, str]:
    key = keys[(i + 1 + rep) % len(keys)]
    leaf, _ = issue_leaf(inter, domain(i), days=LEAF_DAYS, key=key)
    return (
        pem(leaf) + pem(inter.cert),
        key_pem(key),
        sha(leaf.public_bytes(serialization.Encoding.DER)),
    )


def replace_bundle(folder: Path, chain: bytes, key: bytes) -> None:
    """Temp files in the domain's folder, then os.replace both (key first)."""
    (folder / ".privkey.pem.new").write_bytes(key)
    (folder / ".fullchain.pem.new").write_bytes(chain)
    os.replace(folder / ".privkey.pem.new", folder / "privkey.pem")
    os.replace(folder / ".fullchain.pem.new", folder / "fullchain.pem")


def swap_loop(
    port: int,
    root_pem: Path,
    certs: Path,
    n: int,
    reps: int,
    inter: Issuer,
    keys: list[rsa.RSAPrivateKey],
    after_write: Callable[[], None] | None = None,
    published: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """`published(domain)`: a token that changes when the server side has the new bundle
    on disk (edgeproxy: the served file's inode), to split the latency in two."""
    ctx = client_ctx(root_pem)
    lat, pub, polls, poll_errors, timeouts = [], [], [], Counter[str](), 0
    for rep in range(reps):
        i = 1 + rep % (n - 2)
        old = sha(handshake(ctx, port, domain(i)))  # the domain is in use (cached) before
        chain, key, new = new_bundle(inter, keys, i, rep)
        assert new != old
        token = published(domain(i)) if published else None
        t_pub = None
        t0 = time.perf_counter()
        replace_bundle(certs / domain(i), chain, key)
        if after_write is not None:
            after_write()
        k = 0
        while time.perf_counter() - t0 < 30:
            k += 1
            if t_pub is None and published and published(domain(i)) != token:
                t_pub = time.perf_counter() - t0
            try:
                if sha(handshake(ctx, port, domain(i))) == new:
                    break
            except (OSError, ssl.SSLError) as exc:
                poll_errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
                time.sleep(0.01)
        else:
            timeouts += 1
        lat.append((time.perf_counter() - t0) * 1000)
        if t_pub is not None:
            pub.append(t_pub * 1000)
        polls.append(k)
        time.sleep(0.3)
    lat_sorted = sorted(lat)
    return {
        "reps": reps,
        "median_ms": round(statistics.median(lat), 1),
        "p99_ms": round(lat_sorted[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "min_ms": round(lat_sorted[0], 1),
        "max_ms": round(lat_sorted[-1], 1),
        "all_ms": [round(x, 1) for x in lat],
        "published_median_ms": round(statistics.median(pub), 1) if pub else None,
        "published_ms": [round(x, 1) for x in pub],
        "handshakes_polled_median": statistics.median(polls),
        "poll_errors": dict(poll_errors),
        "timeouts": timeouts,
    }


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def edge_swap(
    n: int,
    reps: int,
    run: Path,
    root_pem: Path,
    inter: Issuer,
    keys: list[rsa.RSAPrivateKey],
    workers: int,
) -> dict[str, Any]:
    discard(run)
    certs = link_set(n, run / "certs")
    state = run / "state"
    config = edge_config(run, certs, state, root_pem, workers)
    res: dict[str, Any] = {"n": n, "code": code_version()}
    p = start_edge(config, run / "edge.stderr")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with suppress(OSError):
                if http_get("/readyz")[0] == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("edge not ready for the swap test")
        with background_handshakes(EDGE_PORT, root_pem, domain(n - 1), run / "bg.json") as bg:
            res.update(
                swap_loop(
                    EDGE_PORT,
                    root_pem,
                    certs,
                    n,
                    reps,
                    inter,
                    keys,
                    published=lambda d: _inode(state / "served" / f"{d}.pem"),
                )
            )
        res["background"] = bg
        body = http_get("/metrics", timeout=30)[1]
        res["reloads_loaded"] = metric(body, 'edgeproxy_cert_reloads_total{result="loaded"}')
        res["reloads_rejected"] = metric(body, 'edgeproxy_cert_reloads_total{result="rejected"}')
        return res
    finally:
        stop(p)
        res["stderr"] = stderr_summary(run / "edge.stderr")


# ---------------------------------------------------------------------------------------------
# nginx


def nginx_conf(run: Path, certs: Path, n: int) -> Path:
    conf = run / "nginx.conf"
    with conf.open("w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  server_names_hash_max_size {max(1024, 4 * n)};
  server_names_hash_bucket_size 128;
""")
        for i in range(n):
            d = domain(i)
            f.write(
                f"  server {{ listen {HOST}:{NGINX_PORT} ssl; server_name {d};\n"
                f"    ssl_certificate {certs}/{d}/fullchain.pem;\n"
                f"    ssl_certificate_key {certs}/{d}/privkey.pem;\n"
                f"    location / {{ return 204; }} }}\n"
            )
        f.write("}\n")
    return conf


def nginx_wait(ctx: ssl.SSLContext, name: str, t0: float, budget: float, p: Any) -> float | None:
    while time.perf_counter() - t0 < budget and p.poll() is None:
        try:
            handshake(ctx, NGINX_PORT, name, timeout=2)
            return time.perf_counter() - t0
        except (OSError, ssl.SSLError):
            time.sleep(0.05)
    return None


def nginx_run(n: int, certs: Path, run: Path, root_pem: Path, handshakes: int) -> dict[str, Any]:
    run.mkdir(parents=True, exist_ok=True)
    conf = nginx_conf(run, certs, n)
    ctx = client_ctx(root_pem)
    res: dict[str, Any] = {"n": n}
    t0 = time.perf_counter()
    p = spawn([nginx_bin(), "-c", str(conf)], run / "nginx.stderr")
    try:
        ready = nginx_wait(ctx, domain(n - 1), t0, 600, p)
        res["ready_s"] = round(ready, 3) if ready is not None else None
        if ready is None:
            res["exit_code"] = p.poll()
            return res
        pids = tree(p.pid)
        roles = {pid: ("master" if pid == p.pid else f"worker{k}") for k, pid in enumerate(pids)}
        res["rss_ready"] = memory(pids, roles)
        hs = random_handshakes(ctx, NGINX_PORT, n, handshakes, seed=n)
        hs.pop("used")
        res["handshakes"] = hs
        res["rss_after_handshakes"] = memory(tree(p.pid), roles)
        return res
    finally:
        res["stop_s"] = round(stop(p, timeout=60), 2)
        err = (
            (run / "nginx-error.log").read_text(errors="replace")
            if (run / "nginx-error.log").exists()
            else ""
        )
        res["error_log_lines"] = len(err.splitlines())
        res["error_log_tail"] = err.splitlines()[-3:]


def nginx_swap(
    n: int, reps: int, run: Path, root_pem: Path, inter: Issuer, keys: list[rsa.RSAPrivateKey]
) -> dict[str, Any]:
    discard(run)
    certs = link_set(n, run / "certs")
    conf = nginx_conf(run, certs, n)
    p = spawn([nginx_bin(), "-c", str(conf)], run / "nginx.stderr")
    res: dict[str, Any] = {"n": n}
    reloads: list[float] = []

    def reload() -> None:
        t = time.perf_counter()
        subprocess.run(
            [nginx_bin(), "-c", str(conf), "-s", "reload"],
            check=True,
            timeout=60,
            capture_output=True,
        )
        reloads.append(time.perf_counter() - t)

    try:
        if nginx_wait(client_ctx(root_pem), domain(n - 1), time.perf_counter(), 120, p) is None:
            raise RuntimeError("nginx did not start for the swap test")
        with background_handshakes(NGINX_PORT, root_pem, domain(n - 1), run / "bg.json") as bg:
            res.update(swap_loop(NGINX_PORT, root_pem, certs, n, reps, inter, keys, reload))
        res["background"] = bg
        res["reload_cmd_ms_median"] = round(statistics.median(reloads) * 1000, 1)
        return res
    finally:
        stop(p, timeout=60)
        err = (
            (run / "nginx-error.log").read_text(errors="replace")
            if (run / "nginx-error.log").exists()
            else ""
        )
        res["error_log_lines"] = len(err.splitlines())


# ---------------------------------------------------------------------------------------------
# profiling (optional): the control process's first-start sync, run in this process


def profile_control(n: int, root_pem: Path, inter: Issuer, keys: list[rsa.RSAPrivateKey]) -> str:
    from edgeproxy.config import load_settings
    from edgeproxy.control import make_registry
    from edgeproxy.reload import BATCH

    run = CACHE / "run" / f"profile-{n}"
    discard(run)
    run.mkdir(parents=True)
    settings = load_settings(edge_config(run, ensure_set(n), run / "state", root_pem, 1), env={})
    registry = make_registry(settings)
    logging.getLogger("edgeproxy").setLevel(logging.ERROR)  # as in the runs: level = "error"
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    # What reload.sync runs in its worker thread, called here so cProfile sees it (cProfile
    # only follows the thread it was enabled in).
    registry.open()
    domains = sorted(registry.changed())
    for start in range(0, len(domains), BATCH):
        registry.refresh_many(domains[start : start + BATCH])
    registry.save()
    prof.disable()
    took = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"control first-start sync of {n} domains: {took:.1f} s under cProfile\n")
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(25)
    discard(run)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# report


def _mb(d: dict[str, Any] | None, key: str) -> str:
    return f"{d[key]['rss_mb']:.0f}" if d and d.get(key) else "-"


def _s(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    if d.get("skipped"):
        return "skipped"
    if d.get("ready_s") is None:
        ex = d.get("extrapolation", {})
        est = ex.get("predicted_total_s", "?")
        return f"not ready in {d.get('budget_s', 0):.0f} s (~{est} s est.)"
    return f"{d['ready_s']:.2f}"


def render(results: dict[str, Any]) -> str:
    sizes = sorted(results["sizes"].items(), key=lambda kv: int(kv[0]))  # merged runs: any order
    lines = [
        "# Certificate scale: edgeproxy vs nginx",
        "",
        f"{results['meta']['when']}, {results['meta']['cpus']} CPUs, edgeproxy workers = "
        f"{results['meta']['workers']}, nginx worker_processes 1, {KEY_POOL} shared RSA-2048 "
        "keys, one leaf per domain. RSS = sum of VmRSS over all processes (PSS in brackets).",
        "",
        "| N | edge first start s | RSS ready MB | RSS +1k hs MB | edge restart s | RSS ready MB "
        "| RSS +1k hs MB | nginx start s | nginx RSS MB | nginx +1k hs MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mem(d: dict[str, Any] | None, key: str) -> str:
        if not d or not d.get(key):
            return "-"
        return f"{d[key]['rss_mb']:.0f} ({d[key]['pss_mb']:.0f})"

    for n, r in sizes:
        f, s, x = r.get("edge_first"), r.get("edge_restart"), r.get("nginx")
        lines.append(
            f"| {int(n):,} | {_s(f)} | {mem(f, 'rss_ready')} | {mem(f, 'rss_after_handshakes')} "
            f"| {_s(s)} | {mem(s, 'rss_ready')} | {mem(s, 'rss_after_handshakes')} "
            f"| {_s(x)} | {mem(x, 'rss_ready')} | {mem(x, 'rss_after_handshakes')} |"
        )
    versions = []
    for n, r in sizes:
        for key in ("edge_first", "edge_restart"):
            c = (r.get(key) or {}).get("code")
            if c:
                dirty = f"+{len(c['dirty'])} dirty" if c["dirty"] else ""
                versions.append(
                    f"{int(n):,} {key.split('_')[1]}: {c['head']}{dirty} src {c['source_sha256']}"
                    f", load {'/'.join(c['loadavg'])}"
                )
    if versions:
        lines += [
            "",
            "edgeproxy code per run (HEAD, source hash, loadavg at start): " + "; ".join(versions),
        ]
    synced = [
        f"{int(n):,}: {mem(r['edge_restart'], 'rss_synced')} MB "
        f"at {r['edge_restart']['synced_s']} s"
        for n, r in sizes
        if (r.get("edge_restart") or {}).get("synced_s")
    ]
    if synced:
        lines += [
            "",
            "A restart is ready before its reconcile with the certificates folder ends (the last "
            "run's bundles are served at once); RSS once `certificates_synced` (after the 1k "
            "handshakes): " + "; ".join(synced),
        ]
    sw = results.get("swap", {})
    if sw:
        e, g = sw.get("edgeproxy", {}), sw.get("nginx", {})
        lines += [
            "",
            f"Certificate swap, {e.get('n', '?')} domains, write -> new leaf served "
            f"({e.get('reps', '?')} swaps; background handshakes on another domain meanwhile):",
            "",
            "| server | median ms | p99 ms | max ms | published (served file) median ms "
            "| background ok / failed | poll errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, d in (("edgeproxy (hot reload)", e), ("nginx (-s reload)", g)):
            if d and "median_ms" in d:
                bg = d.get("background", {})
                lines.append(
                    f"| {name} | {d['median_ms']} | {d['p99_ms']} | {d['max_ms']} "
                    f"| {d.get('published_median_ms') or '-'} "
                    f"| {bg.get('ok', '?')} / {bg.get('failed', '?')} "
                    f"| {sum(d['poll_errors'].values())} |"
                )
            elif d:
                lines.append(f"| {name} | error: {d.get('error', '?')} | | | | | |")
    tp = results.get("throughput")
    if tp:
        lines += [
            "",
            f"Handshakes/s, one client process, no session reuse, {tp['domains']:,} domains "
            f"(median of {tp['rounds']} rounds x {tp['handshakes_per_round']}):",
            "",
            "| context cache | handshakes/s |",
            "|---|---|",
            f"| cold (each handshake a never-seen domain) | {tp['cold_hs_per_s']:.0f} |",
            f"| warm ({tp['warm_domains']} domains) | {tp['warm_hs_per_s']:.0f} |",
        ]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def write_results(
    results: dict[str, Any], phases: dict[str, float], quick: bool, merge: bool
) -> None:
    stem = "certs_scale_quick" if quick else "certs_scale"
    if merge and (OUT / f"{stem}.json").exists():
        earlier = json.loads((OUT / f"{stem}.json").read_text())
        for n, row in results["sizes"].items():
            earlier["sizes"].setdefault(n, {}).update(row)
        if results.get("swap"):
            earlier.setdefault("swap", {}).update(results["swap"])
        if results.get("throughput"):
            earlier["throughput"] = results["throughput"]
        earlier["notes"] = [
            n
            for n in earlier.get("notes", [])
            if not any(n.startswith(f"N={k}:") for k in results["sizes"])
        ] + results["notes"]
        earlier.setdefault("merged_runs", []).append(
            {"meta": results["meta"], "phases_s": phases, "sizes": list(results["sizes"])}
        )
        results = earlier
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    report = render(results)
    (OUT / f"{stem}.md").write_text(report)
    print(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=50, few repetitions")
    ap.add_argument("--workers", type=int, default=1, help="edgeproxy server.workers")
    ap.add_argument("--handshakes", type=int, default=1000)
    ap.add_argument("--swap-reps", type=int, default=30)
    ap.add_argument("--first-start-budget", type=float, default=600.0, help="seconds")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument(
        "--restart-only",
        action="store_true",
        help="measure only restarts, on the state a previous run kept (implies --merge)",
    )
    ap.add_argument("--profile-control", type=int, metavar="N", help="only profile, then exit")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="update the sizes/sections measured now in the existing certs_scale.json",
    )
    args = ap.parse_args()
    if args.restart_only:
        args.merge = True
    sizes = [int(s) for s in args.sizes.split(",")]
    swap_n, tp_n, tp = SWAP_N, THROUGHPUT_N, (3, 1000, 100)
    if args.quick:
        sizes, swap_n, tp_n, tp = [50], 50, 50, (1, 10, 10)
        args.handshakes, args.swap_reps = 20, 3
    if not Path(nginx_bin()).exists():
        args.no_nginx = True
    if not ports_free(HOST, [EDGE_PORT, METRICS_PORT, NGINX_PORT]):
        return 1
    interrupt_on_sigterm()
    phases: dict[str, float] = {}
    results: dict[str, Any] = {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "cpus": os.cpu_count(),
            "workers": args.workers,
            "quick": args.quick,
            "nginx": subprocess.run(
                [nginx_bin(), "-v"], capture_output=True, text=True, check=False
            ).stderr.strip()
            if not args.no_nginx
            else None,
        },
        "sizes": {},
        "notes": [],
        "phases_s": phases,
    }
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        CACHE.mkdir(parents=True, exist_ok=True)
        root, inter, keys = load_or_make_pki(CACHE / "pki")
        root_pem = CACHE / "pki" / "root.pem"
        ensure_pool(max([*sizes, swap_n, tp_n if tp_n in sizes else 0]), inter, keys)
        phases["generate"] = round(time.perf_counter() - t, 1)
        if args.profile_control:
            t = time.perf_counter()
            ensure_pool(args.profile_control, inter, keys)
            text = profile_control(args.profile_control, root_pem, inter, keys)
            (OUT / f"certs_scale_profile_{args.profile_control}.txt").write_text(text)
            print(text)
            return 0
        runs = CACHE / "run"
        for n in sizes:
            log(f"N={n}: preparing the certificate set")
            t = time.perf_counter()
            certs = ensure_set(n)
            phases[f"set_{n}"] = round(time.perf_counter() - t, 1)
            row: dict[str, Any] = {}
            results["sizes"][str(n)] = row
            run = runs / f"edge-{n}"

            def restart(n: int = n, certs: Path = certs, run: Path = run) -> dict[str, Any]:
                log(f"N={n}: edgeproxy restart")
                t = time.perf_counter()
                res = edge_run(
                    n,
                    certs,
                    run,
                    root_pem,
                    fresh=False,
                    workers=args.workers,
                    budget_s=args.first_start_budget,
                    handshakes=args.handshakes,
                )
                phases[f"edge_restart_{n}"] = round(time.perf_counter() - t, 1)
                log(f"    -> {_s(res)} s")
                return res

            if args.restart_only:
                if not (run / "state" / "index.json").exists():
                    raise SystemExit(f"--restart-only: no kept state in {run}/state")
                row["edge_restart"] = restart()
                continue
            discard(run)
            run.mkdir(parents=True)
            throughput = throughput_test(n, *tp) if n == tp_n else None
            log(f"N={n}: edgeproxy first start")
            t = time.perf_counter()
            row["edge_first"] = edge_run(
                n,
                certs,
                run,
                root_pem,
                fresh=True,
                workers=args.workers,
                budget_s=args.first_start_budget,
                handshakes=args.handshakes,
                throughput=throughput,
            )
            phases[f"edge_first_{n}"] = round(time.perf_counter() - t, 1)
            if row["edge_first"].get("throughput"):
                results["throughput"] = row["edge_first"]["throughput"]
            log(f"    -> {_s(row['edge_first'])} s")
            if row["edge_first"]["ready_s"] is not None:
                row["edge_restart"] = restart()
            else:
                ex = row["edge_first"]["extrapolation"]
                results["notes"].append(
                    f"N={n}: first start was stopped after {args.first_start_budget:.0f} s with "
                    f"{ex.get('validated_at_stop')} of {n} domains validated; the per-domain "
                    f"cost grew from {ex.get('ms_per_domain_at_start')} ms to "
                    f"{ex.get('ms_per_domain_at_n')} ms (extrapolated at N); predicted total "
                    f"{ex.get('predicted_total_s')} s. Restart not measured (no complete state)."
                )
            discard(run / "state")
            if args.no_nginx:
                continue
            done = {int(k): v["nginx"] for k, v in results["sizes"].items() if v.get("nginx")}
            done = {k: v for k, v in done.items() if v.get("ready_s")}
            if done:
                k = max(done)
                predicted = done[k]["ready_s"] * n / k
                if predicted > NGINX_BUDGET_S:
                    row["nginx"] = {"skipped": True, "predicted_start_s": round(predicted)}
                    results["notes"].append(
                        f"N={n}: nginx skipped: start predicted ~{predicted:.0f} s "
                        f"(linear from {done[k]['ready_s']:.1f} s at N={k}), over the "
                        f"{NGINX_BUDGET_S:.0f} s budget."
                    )
                    continue
            log(f"N={n}: nginx")
            t = time.perf_counter()
            row["nginx"] = nginx_run(n, certs, runs / f"nginx-{n}", root_pem, args.handshakes)
            phases[f"nginx_{n}"] = round(time.perf_counter() - t, 1)
            log(f"    -> {_s(row['nginx'])} s")
        log(f"swap test on {swap_n} domains: edgeproxy")
        ensure_set(swap_n)
        t = time.perf_counter()
        results["swap"] = {}
        try:
            results["swap"]["edgeproxy"] = edge_swap(
                swap_n, args.swap_reps, runs / "swap-edge", root_pem, inter, keys, args.workers
            )
        except (RuntimeError, OSError, ssl.SSLError) as exc:
            results["swap"]["edgeproxy"] = {"error": repr(exc)}
        phases["swap_edge"] = round(time.perf_counter() - t, 1)
        if not args.no_nginx:
            log(f"swap test on {swap_n} domains: nginx")
            t = time.perf_counter()
            try:
                results["swap"]["nginx"] = nginx_swap(
                    swap_n, args.swap_reps, runs / "swap-nginx", root_pem, inter, keys
                )
            except (RuntimeError, OSError, ssl.SSLError, subprocess.SubprocessError) as exc:
                results["swap"]["nginx"] = {"error": repr(exc)}
            phases["swap_nginx"] = round(time.perf_counter() - t, 1)
        for name in ("swap-edge", "swap-nginx"):
            discard(runs / name)
    finally:
        cleanup()
        empty_trash()  # last: see discard()
        phases["total"] = round(time.perf_counter() - t_all, 1)
        OUT.mkdir(parents=True, exist_ok=True)
        if results["sizes"] or results.get("swap"):  # not after --profile-control
            write_results(results, phases, args.quick, args.merge)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    finally:
        cleanup()
