"""Access lines: gathered in the worker, written to stdout in batches."""

from __future__ import annotations

import fcntl
import json
import os
import time

from edgeproxy.logging import AccessLog


def _read(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return []
    return [json.loads(line) for line in data.decode().splitlines()]


def _line(log: AccessLog, status: int = 204, path: str = "/track", bytes_in: int = 0) -> None:
    log.request(
        1, "192.0.2.1", "t.alpha.test", "POST", path, path, status, bytes_in, 0, 0.001, None
    )


def test_lines_wait_for_a_flush_then_go_in_one_write():
    r, w = os.pipe()
    log = AccessLog(w)
    _line(log, 200, "/track")
    _line(log, 204, "/collection")
    assert _read(r) == []  # nothing written per request
    log.flush()
    assert [d["status"] for d in _read(r)] == [200, 204]
    log.flush()  # nothing pending: nothing written
    assert _read(r) == []
    os.close(r)
    os.close(w)


def test_a_full_batch_is_written_without_waiting():
    r, w = os.pipe()
    log = AccessLog(w)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # a batch (~100 KB) passes the default 64 KiB
    for i in range(AccessLog.LIMIT):
        _line(log, bytes_in=i)
    assert [d["bytes_in"] for d in _read(r)] == list(range(AccessLog.LIMIT))
    os.close(r)
    os.close(w)


def test_a_closed_stdout_loses_lines_not_the_worker():
    r, w = os.pipe()
    os.close(r)
    log = AccessLog(w)
    _line(log)
    log.flush()  # EPIPE: dropped, reported once, no exception
    _line(log)
    log.flush()
    os.close(w)


def test_a_request_line_is_json_with_every_field_escaped():
    """Request lines are formatted from a template, not json.dumps: still one JSON object
    with the documented keys in order, and hostile strings (quotes, backslashes, control
    characters, latin-1 bytes from a raw path) come back exactly as they went in."""
    r, w = os.pipe()
    log = AccessLog(w)
    path = '/track/"x"\\y\n\x00\x1f\xe9' + "z" * 10
    log.request(
        41,
        "203.0.113.7",
        "t.alpha.test",
        "POST",
        path,
        "/track",
        204,
        306,
        0,
        0.0123456,
        "http://127.0.0.1:8081",
    )
    log.request(41, "unknown", "", "GET", "/nope", "-", 404, 0, 0, 0.0, None)
    log.flush()
    first, second = _read(r)
    assert list(first) == [
        "ts",
        "pid",
        "client",
        "sni",
        "method",
        "path",
        "route",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream",
    ]
    assert first["path"] == path and first["client"] == "203.0.113.7"
    assert (first["status"], first["bytes_in"], first["duration_ms"]) == (204, 306, 12.346)
    assert abs(first["ts"] - time.time()) < 5
    assert second["upstream"] is None and second["sni"] == "" and second["status"] == 404
    os.close(r)
    os.close(w)
