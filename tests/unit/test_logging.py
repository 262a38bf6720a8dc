"""Access lines: gathered in the worker, written to stdout in batches."""

from __future__ import annotations

import json
import os

from edgeproxy.logging import AccessLog


def _read(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return []
    return [json.loads(line) for line in data.decode().splitlines()]


def test_lines_wait_for_a_flush_then_go_in_one_write():
    r, w = os.pipe()
    log = AccessLog(w)
    log.add({"status": 200, "path": "/track"})
    log.add({"status": 204, "path": "/collection"})
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
    for i in range(AccessLog.LIMIT):
        log.add({"n": i})
    assert [d["n"] for d in _read(r)] == list(range(AccessLog.LIMIT))
    os.close(r)
    os.close(w)


def test_a_closed_stdout_loses_lines_not_the_worker():
    r, w = os.pipe()
    os.close(r)
    log = AccessLog(w)
    log.add({"status": 200})
    log.flush()  # EPIPE: dropped, reported once, no exception
    log.add({"status": 200})
    log.flush()
    os.close(w)
