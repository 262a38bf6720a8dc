"""The supervisor: binds the sockets, builds the base TLS context, forks and tends workers.

Rules:
- Everything that can fail at start (config, addresses, permissions) fails here, before any
  process is forked, with a message naming what failed.
- The supervisor runs no event loop and no threads, so forking a replacement worker at any
  time is safe. It imports nothing that imports prometheus_client until the multiprocess
  directory is set in the environment.
- One socket per listener per worker with SO_REUSEPORT when there are several workers, so
  the kernel spreads connections evenly; the supervisor keeps every socket open, so a
  replacement worker takes over its predecessor's queue without losing connections.

Signals: SIGTERM/SIGINT drain every child and exit 0; SIGHUP is passed on to the workers
(rescan certificates); a worker that dies is restarted, with a back-off if it keeps dying.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field

from edgeproxy.config import Address, Settings
from edgeproxy.errors import ConfigError
from edgeproxy.logging import server_log, setup_logging
from edgeproxy.tls.sni import new_server_context

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def bind(address: Address, *, reuse_port: bool, backlog: int) -> socket.socket:
    """A listening TCP socket. Raises ConfigError naming the address when it can't bind."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {address}: {exc.strerror or exc}",
            hint="is another process using the port, or is it privileged?",
        ) from exc
    return sock


@dataclass
class Supervisor:
    settings: Settings
    listeners: list[list[socket.socket]] = field(default_factory=list)
    """listeners[i] are worker i's sockets (the same ones for all workers without reuseport)."""
    metrics_sock: socket.socket | None = None
    admin_sock: socket.socket | None = None
    workers: dict[int, int] = field(default_factory=dict)
    """pid -> worker slot."""
    control_pid: int | None = None
    restarts: list[float] = field(default_factory=list)
    base_ctx: ssl.SSLContext = field(default_factory=new_server_context)
    """Made once before any fork: every worker shares its session-ticket keys."""

    def bind_all(self) -> None:
        n = self.settings.server.worker_count
        backlog = self.settings.server.backlog
        per_worker: list[list[socket.socket]] = [[] for _ in range(n)]
        for address in self.settings.server.listen:
            if n == 1:
                per_worker[0].append(bind(address, reuse_port=False, backlog=backlog))
                continue
            first = bind(address, reuse_port=True, backlog=backlog)
            # With port 0 the kernel picked one: the other workers bind that same port.
            actual = Address(address.host, first.getsockname()[1])
            per_worker[0].append(first)
            for i in range(1, n):
                per_worker[i].append(bind(actual, reuse_port=True, backlog=backlog))
        self.listeners = per_worker
        if self.settings.metrics.listen is not None:
            self.metrics_sock = bind(self.settings.metrics.listen, reuse_port=False, backlog=128)
        if self.settings.admin.listen is not None:
            self.admin_sock = bind(self.settings.admin.listen, reuse_port=False, backlog=128)

    def _fork(self, target: str, slot: int = 0) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        # --- child ---
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            setup_logging(self.settings.log.level)
            if target == "worker":
                from edgeproxy.server import run_worker

                mine = self.listeners[slot]
                self._close_except(mine)
                code = run_worker(self.settings, mine, self.base_ctx, parent)
            else:
                from edgeproxy.control import run_control

                mine = [s for s in (self.metrics_sock, self.admin_sock) if s is not None]
                self._close_except(mine)
                code = run_control(self.settings, self.metrics_sock, self.admin_sock, parent)
        except BaseException:
            server_log.exception("%s process failed", target)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _close_except(self, keep: list[socket.socket]) -> None:
        for socks in self.listeners:
            for s in socks:
                if s not in keep:
                    s.close()
        for sock in (self.metrics_sock, self.admin_sock):
            if sock is not None and sock not in keep:
                sock.close()

    def start_worker(self, slot: int) -> None:
        pid = self._fork("worker", slot)
        self.workers[pid] = slot

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        self.control_pid = self._fork("control")
        for slot in range(len(self.listeners)):
            self.start_worker(slot)
        server_log.info(
            "edge started",
            extra={
                "pid": os.getpid(),
                "workers": len(self.listeners),
                "listen": [str(a) for a in self.settings.server.listen],
                "metrics": str(self.settings.metrics.listen),
            },
        )
        while True:
            info = signal.sigtimedwait(_SIGNALS, 1.0)
            if info is None:
                continue
            if info.si_signo == signal.SIGCHLD:
                self._reap()
            elif info.si_signo == signal.SIGHUP:
                for pid in [*self.workers, *([self.control_pid] if self.control_pid else [])]:
                    _kill(pid, signal.SIGHUP)
            else:
                return self.shutdown()

    def _reap(self) -> None:
        from prometheus_client import multiprocess

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
            code = os.waitstatus_to_exitcode(status)
            if pid == self.control_pid:
                server_log.error("control process exited (%s); restarting it", code)
                self.control_pid = self._fork("control")
                continue
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            server_log.error(
                "worker %s exited (%s); restarting it", pid, code, extra={"pid": pid, "exit": code}
            )
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 10] + [now]
            if len(self.restarts) > 5:
                time.sleep(1.0)  # crash loop: don't spin the CPU
            self.start_worker(slot)

    def shutdown(self) -> int:
        """Drain every child: SIGTERM, wait up to drain_timeout + 5 s, then SIGKILL."""
        children = [*self.workers, *([self.control_pid] if self.control_pid else [])]
        for pid in children:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.drain_timeout + 5.0
        alive = set(children)
        while alive and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.02)
            else:
                alive.discard(pid)
        for pid in alive:
            _kill(pid, signal.SIGKILL)
        for socks in self.listeners:
            for s in socks:
                s.close()
        server_log.info("edge stopped", extra={"killed": len(alive)})
        return 0


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


METRICS_DIR_PREFIX = "edgeproxy-metrics-"
# (Linux pids have at most 7 digits; a longer number in a name someone else made must not
# reach os.kill, which raises OverflowError past a C int.)
_METRICS_DIR = re.compile(rf"{METRICS_DIR_PREFIX}(\d{{1,7}})-")


def _metrics_dir() -> str:
    """A new multiprocess metrics folder in the temp folder, named after this supervisor.

    A supervisor that was killed (SIGKILL, the OOM killer) left its folder behind: the
    folders of supervisors no longer running are removed first, so restarts after crashes
    don't pile them up. A running one's is never touched, whoever runs it.
    """
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            m = _METRICS_DIR.match(entry.name)
            if (
                m
                and entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                and not _running(int(m[1]))
            ):
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def serve(settings: Settings) -> int:
    """Run the edge in the foreground until SIGTERM/SIGINT; returns the exit code.

    Raises:
        ConfigError: a listener can't be bound.
    """
    setup_logging(settings.log.level)
    prom_dir = _metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    try:
        supervisor = Supervisor(settings)
        supervisor.bind_all()
        return supervisor.run()
    finally:
        shutil.rmtree(prom_dir, ignore_errors=True)
