"""edgeproxy: the TLS edge for first-party (CNAME) tracking."""

from edgeproxy import compiled

__version__ = "0.1.0"

compiled.check()
