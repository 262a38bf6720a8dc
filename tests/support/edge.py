"""Start `edgeproxy serve` as a real process, the way an operator does, and wait for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(out) + "\n"


class Edge:
    """A running edge process: ports, logs, and a clean stop."""

    def __init__(self, workdir: Path, config: dict[str, dict[str, Any]]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        config.setdefault("server", {}).setdefault("listen", [f"127.0.0.1:{self.port}"])
        config.setdefault("metrics", {})["listen"] = f"127.0.0.1:{self.metrics_port}"
        config.setdefault("admin", {}).setdefault("listen", "")
        # Each edge keeps its own state, even when several share one certificates folder.
        config.setdefault("certs", {}).setdefault("state_dir", str(workdir / "state"))
        self.config_path = workdir / "edgeproxy.toml"
        self.config_path.write_text(to_toml(config))
        self.stdout_path = workdir / "edge.stdout"
        self.stderr_path = workdir / "edge.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0, env: dict[str, str] | None = None) -> Edge:
        """Start it as an operator does (`env`: more environment, for test instruments)."""
        # The test run's own EDGEPROXY_ settings stay out, except the choice of connections
        # (tls/native.py): `make test` runs part of the suite again on the Python ones.
        keep = ("EDGEPROXY_PY_TRANSPORT",)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_") or k in keep
        } | (env or {})
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy", "serve", "--config", str(self.config_path)],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge exited {self.proc.returncode}: {self.stderr()}")
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"edge not ready in {timeout}s: {self.stderr()}")

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value from a fresh scrape (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            sname, _, lab = key.partition("{")
            if sname != name:
                continue
            got = ",".join(sorted(p for p in lab.rstrip("}").split(",") if p))
            if got == want:
                return float(value)
        return 0.0

    def settled_sample(self, name: str, **labels: str) -> float:
        """A sample once it stops moving: workers hand counts over every 0.2 s, so a reading
        taken right after earlier traffic may not include it yet."""
        value = self.sample(name, **labels)
        for _ in range(20):
            time.sleep(0.3)
            again = self.sample(name, **labels)
            if again == value:
                break
            value = again
        return value

    def wait_sample(self, name: str, want: float, timeout: float = 3.0, **labels: str) -> float:
        """A sample once it reaches `want` (histograms are flushed a few times a second)."""
        deadline = time.monotonic() + timeout
        value = self.sample(name, **labels)
        while value != want and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.sample(name, **labels)
        return value

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def access(self) -> list[dict[str, Any]]:
        lines = self.stdout_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_access(self, n: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        """The access lines once there are `n` (workers write them a few times a second)."""
        deadline = time.monotonic() + timeout
        lines = self.access()
        while len(lines) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = self.access()
        return lines

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
