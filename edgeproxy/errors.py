"""The small exception tree every layer raises; only cli.py turns these into exit codes.

Each error carries a `message` written for the operator (what failed, where, what to do)
and an optional `hint`.
"""

from __future__ import annotations


class EdgeProxyError(Exception):
    """Base of every error edgeproxy raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"


class ConfigError(EdgeProxyError):
    """The configuration file or a setting in it is invalid; names the key."""


class CertificateError(EdgeProxyError):
    """A certificate bundle cannot be used; names the domain and the file."""


class UpstreamError(EdgeProxyError):
    """Forwarding to an upstream failed; `status_hint` is what the client should see."""

    status_hint = 502


class UpstreamUnavailable(UpstreamError):
    """No upstream of the route accepted a connection (or it broke before answering)."""

    status_hint = 502


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer within the route's timeout."""

    status_hint = 504
