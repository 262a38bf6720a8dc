"""What the CLI uses to talk to the admin API (plain urllib: no event loop for a CLI)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeproxy.errors import ConfigError, EdgeProxyError


class ApiError(EdgeProxyError):
    """The admin API answered with an error status; `doc` is its JSON body."""

    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        message = doc.get("message") or "; ".join(doc.get("errors", [])) or f"HTTP {status}"
        super().__init__(f"admin API answered {status}: {message}")
        self.status = status
        self.doc = doc


@dataclass(frozen=True, slots=True)
class AdminClient:
    base_url: str
    token: str
    timeout: float = 30.0

    @classmethod
    def from_options(cls, url: str | None, token_file: Path | None) -> AdminClient:
        """URL: flag, else EDGEPROXY_ADMIN_URL, else the default listener. Token: file flag,
        else EDGEPROXY_ADMIN_TOKEN, else conf/admin.token."""
        base = url or os.environ.get("EDGEPROXY_ADMIN_URL") or "http://127.0.0.1:9200"
        token = os.environ.get("EDGEPROXY_ADMIN_TOKEN", "") if token_file is None else ""
        if not token:
            path = token_file or Path("conf/admin.token")
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the admin token {path}: {exc.strerror or exc}",
                    hint="pass --token-file or set EDGEPROXY_ADMIN_TOKEN",
                ) from exc
        return cls(base.rstrip("/"), token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                **({"Content-Type": "application/json"} if data else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"message": raw.decode(errors="replace")[:200]}
            raise ApiError(exc.code, doc if isinstance(doc, dict) else {}) from exc
        except urllib.error.URLError as exc:
            raise EdgeProxyError(
                f"cannot reach the admin API at {self.base_url}: {exc.reason}",
                hint="is the edge running? --admin-url?",
            ) from exc
        return json.loads(raw) if raw else None
