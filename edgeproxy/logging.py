"""Named loggers, a JSON-lines formatter, and redaction helpers.

Never log private keys, PEM bodies, full cookie values or beacon payloads: log a
certificate's SHA-256 fingerprint (a prefix) and path instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from json.encoder import encode_basestring_ascii as _json_str  # (C) a quoted JSON string
from typing import Any

tls_log = logging.getLogger("edgeproxy.tls")
reload_log = logging.getLogger("edgeproxy.reload")
proxy_log = logging.getLogger("edgeproxy.proxy")
admin_log = logging.getLogger("edgeproxy.admin")
server_log = logging.getLogger("edgeproxy.server")

# LogRecord attributes that are not structured fields passed through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup_logging(level: str = "info") -> None:
    """Send every edgeproxy logger to stderr as JSON (access lines: see AccessLog)."""
    root = logging.getLogger("edgeproxy")
    root.handlers.clear()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)


class AccessLog:
    """JSON access lines, one per request, written to stdout in batches.

    Through `logging`, a line cost a LogRecord and a write(2) per request: ~20 us, as much
    as the rest of a keep-alive beacon's Python. Lines are gathered here and written in one
    write when `flush` runs (with the metrics, a few times a second), when 512 are pending,
    and when the worker stops.
    """

    LIMIT = 512
    # The keys and order of a request's line (see `request`).
    LINE = (
        '{"ts":%.6f,"pid":%d,"client":%s,"sni":%s,"method":%s,"path":%s,"route":%s,'
        '"status":%d,"bytes_in":%d,"bytes_out":%d,"duration_ms":%.3f,"upstream":%s}'
    )

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self._lines: list[str] = []
        self._failed = False

    def request(
        self,
        pid: int,
        client: str,
        sni: str,
        method: str,
        path: str,
        route: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        upstream: str | None,
    ) -> None:
        """One request's line: formatted from a template, its strings escaped by json's C
        escaper (json.dumps of a dict cost ~6 us per beacon, this ~1)."""
        self._lines.append(
            self.LINE
            % (
                time.time(),
                pid,
                _json_str(client),
                _json_str(sni),
                _json_str(method),
                _json_str(path),
                _json_str(route),
                status,
                bytes_in,
                bytes_out,
                seconds * 1000,
                "null" if upstream is None else _json_str(upstream),
            )
        )
        if len(self._lines) >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data = memoryview(("\n".join(self._lines) + "\n").encode())
        self._lines.clear()
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:  # stdout closed or full: lose lines, never the worker
            if not self._failed:
                self._failed = True
                server_log.error("access lines are being dropped: %s", exc)
