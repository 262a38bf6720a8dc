"""A flat folder watched with Linux inotify from the event loop itself: no thread, no polling.

Workers follow the served folder with this rather than watchfiles: watchfiles' Rust loop
runs in a thread that takes the GIL every `step` to check for a stop, and under load that
cost a worker about half a futex(2) and a third of a getpid(2) per proxied request (GIL
hand-offs and anyio's thread hops), plus the wait of up to one step for each change. Here
the kernel queues an event inside the rename(2) that publishes a file, and the loop reads
it as soon as the descriptor is readable.

The control process still watches the certificate folder with watchfiles: that tree is
recursive, may be a Kubernetes volume of symlinks, and is off the request path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_LOST = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
"""Events after which names can't be trusted: the caller rescans the folder."""
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

_libc = ctypes.CDLL(None, use_errno=True)


class RESCAN:
    """Returned by `FolderWatch.read` in place of names: events were lost, list the folder."""


class FolderWatch:
    """inotify on one folder (not recursive). `fileno()` goes to `loop.add_reader`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        fd = int(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._wd = -1
        self.rewatch()

    def rewatch(self) -> None:
        """(Re)attach the watch: at start, and after the folder was removed or replaced."""
        if self._wd >= 0:
            # A moved folder keeps its old watch: drop it (it fails harmlessly if gone).
            _libc.inotify_rm_watch(self.fd, self._wd)
            self._wd = -1
        self.folder.mkdir(parents=True, exist_ok=True)
        wd = int(_libc.inotify_add_watch(self.fd, os.fsencode(self.folder), _MASK))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {self.folder}: {os.strerror(err)}")
        self._wd = wd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> set[str] | type[RESCAN]:
        """Every name changed since the last read (non-blocking; empty when none), or
        RESCAN when the kernel's queue overflowed or the folder itself went away."""
        names: set[str] = set()
        lost = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _wd, mask, _cookie, size = _EVENT.unpack_from(buf, offset)
                offset += _EVENT.size
                name = buf[offset : offset + size].split(b"\0", 1)[0]
                offset += size
                if mask & _LOST:
                    lost = True
                elif name:
                    names.add(os.fsdecode(name))
        if lost:
            return RESCAN
        return names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
