"""The one place tasks are created: a reference is kept until the task ends (asyncio only
keeps weak ones, so a fire-and-forget task can be garbage-collected mid-flight) and every
task gets a name that shows up in debug output."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

T = TypeVar("T")

_background: set[asyncio.Task[Any]] = set()


def create_task(
    coro: Coroutine[Any, Any, T], *, name: str, keep_ref: bool = True
) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    if keep_ref:
        _background.add(task)
        task.add_done_callback(_background.discard)
    return task


def as_protocol(protocol: object) -> asyncio.Protocol:
    """A protocol class that doesn't subclass asyncio.Protocol, typed as one for the loop.

    The beacon path's protocols (ClientConnection, UpstreamConnection) have the protocol
    methods without the base class: compiled by mypyc (setup.py), a class with a pure-Python
    base keeps its attributes in a dict, one without is a C struct (~20% of a beacon).
    """
    return cast(asyncio.Protocol, protocol)


def watch_parent(loop: asyncio.AbstractEventLoop, parent_pid: int, stop: asyncio.Event) -> None:
    """Set `stop` once the supervisor is gone (killed with SIGKILL): an orphaned worker or
    control process stops instead of running forever."""

    def check() -> None:
        if os.getppid() != parent_pid:
            logging.getLogger("edgeproxy.server").warning("supervisor is gone; stopping")
            stop.set()
        else:
            loop.call_later(1.0, check)

    loop.call_later(1.0, check)
