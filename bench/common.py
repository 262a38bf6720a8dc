"""What bench/run.py and bench/certs_scale.py share: the processes they start, and /proc.

Everything started through `spawn` (in its own process group) or registered in `forked` is
stopped by `cleanup()`, which both scripts run at exit, so an interrupted benchmark leaves
no nginx, edge or load process behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

started: list[subprocess.Popen[bytes]] = []
forked: list[mp.process.BaseProcess] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spawn(cmd: list[str], stderr_file: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with stderr_file.open("ab") as err:
        p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, **kw
        )
    started.append(p)
    return p


def kill_group(p: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        p.wait(5)


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
    """Graceful stop of a process we started, then SIGKILL whatever is left in its group.
    Returns how long the graceful part took."""
    t0 = time.perf_counter()
    if p.poll() is None:
        with suppress(ProcessLookupError):
            p.send_signal(sig)
        with suppress(subprocess.TimeoutExpired):
            p.wait(timeout)
    took = time.perf_counter() - t0
    kill_group(p)
    if p in started:
        started.remove(p)
    return took


def cleanup() -> None:
    for child in list(forked):
        if child.is_alive():
            child.kill()
            child.join(5)
    forked.clear()
    for p in list(started):
        stop(p, timeout=15)


def children(pid: int) -> list[int]:
    out: list[int] = []
    with suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 1000:
        cur = todo.pop()
        out.append(cur)
        todo += children(cur)
    return out


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def ports_free(host: str, ports: list[int]) -> bool:
    """False (and says which) when something already listens on one of `ports`."""
    for port in ports:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                log(f"port {port} on {host} is in use; stop whatever holds it")
                return False
    return True


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally: cleanup()` runs."""

    def on_signal(signum: int, _: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
