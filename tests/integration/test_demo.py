"""`edgeproxy demo` as a new user runs it: the printed curl line gets a 2xx through the edge."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.edge import free_port


def test_demo_prints_a_curl_line_that_works(tmp_path: Path):
    ports = [free_port() for _ in range(3)]
    args = [
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(ports[0]),
        "--backend-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
    ]
    out_path = tmp_path / "demo.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "demo", *args], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        curl = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and curl is None:
            text = out_path.read_text()
            if '"worker ready"' in text and '"certificates synced"' in text:
                curl = next(line for line in text.splitlines() if line.startswith("curl "))
            time.sleep(0.1)
        assert curl is not None, out_path.read_text()
        argv = shlex.split(curl)
        assert "--cacert" in argv and "--resolve" in argv
        result = subprocess.run(
            [*argv, "-sS", "-o", "/dev/null", "-w", "%{http_code}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.stdout.startswith("2"), result
        assert "backend got beacon #1" in out_path.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
