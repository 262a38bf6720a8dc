"""Named loggers, a JSON-lines formatter, and redaction helpers.

Never log private keys, PEM bodies, full cookie values or beacon payloads: log a
certificate's SHA-256 fingerprint (a prefix) and path instead.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

access_log = logging.getLogger("edgeproxy.access")
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


def setup_logging(level: str = "info", *, access: bool = True) -> None:
    """Send every edgeproxy logger to stderr as JSON; access lines go to stdout."""
    root = logging.getLogger("edgeproxy")
    root.handlers.clear()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    access_log.handlers.clear()
    access_log.propagate = False
    access_log.disabled = not access
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(_AccessFormatter())
    access_log.addHandler(access_handler)
    access_log.setLevel(logging.INFO)


class _AccessFormatter(logging.Formatter):
    """Access lines are built as dicts by the forwarder; this only serialises them."""

    def format(self, record: logging.LogRecord) -> str:
        doc = record.args if isinstance(record.args, dict) else {"msg": record.getMessage()}
        return json.dumps(doc, separators=(",", ":"))
