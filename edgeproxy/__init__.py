"""edgeproxy: the TLS edge for first-party (CNAME) tracking."""

__version__ = "0.1.0"
