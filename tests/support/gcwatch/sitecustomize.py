"""Loaded into an edge under test through PYTHONPATH (tests/integration/test_memory.py):
each forked process (the workers) keeps what its cycle collector finds (gc.DEBUG_SAVEALL)
and, when `$GCWATCH_DIR/collect` appears, collects and writes the kept objects' type names
to `$GCWATCH_DIR/garbage.<pid>.json`. Only for tests: nothing in edgeproxy knows of it."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path


def _watch(where: Path) -> None:
    trigger = where / "collect"
    while not trigger.exists():
        time.sleep(0.05)
    gc.collect()
    kept = Counter(type(o).__qualname__ for o in gc.garbage)
    out = where / f"garbage.{os.getpid()}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept))
    tmp.rename(out)


def _in_child() -> None:
    gc.set_debug(gc.DEBUG_SAVEALL)
    threading.Thread(target=_watch, args=(Path(os.environ["GCWATCH_DIR"]),), daemon=True).start()


if os.environ.get("GCWATCH_DIR"):
    os.register_at_fork(after_in_child=_in_child)
