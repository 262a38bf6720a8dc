"""Expiry reminders: the seed promises a reminder 60 days before a certificate expires.

Rules:
- Thresholds are `notify.reminder_days` (default 60, 30, 14, 7, 1) plus the moment of
  expiry. A certificate gets one reminder per threshold it has crossed, the most urgent
  first; thresholds it crossed before the edge first saw it are not sent one by one.
- Each (certificate fingerprint, threshold) is sent once: a ledger in the state folder
  survives restarts, and only the control process sends, so workers never duplicate.
- A reminder is always logged; with `notify.webhook_url` it is also POSTed as JSON. A
  failed POST is not marked sent and is tried again at the next check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from edgeproxy.config import NotifySettings
from edgeproxy.logging import reload_log
from edgeproxy.tls.registry import Entry, atomic_write

EXPIRED = 0
"""The threshold for a certificate whose notAfter has passed."""

Send = Callable[[dict[str, Any]], Awaitable[None]]


class ExpiryNotifier:
    def __init__(
        self, settings: NotifySettings, ledger_file: Path, send: Send | None = None
    ) -> None:
        self.settings = settings
        self.ledger_file = ledger_file
        self._send = send or self._post
        self.sent: dict[str, float] = {}
        try:
            self.sent = json.loads(ledger_file.read_text()).get("sent", {})
        except (OSError, ValueError, AttributeError):
            self.sent = {}

    def due(self, entries: Iterable[Entry], now: float) -> list[dict[str, Any]]:
        """The reminders to send now: for each certificate, the most urgent new threshold."""
        out = []
        for e in entries:
            if e.served is None:
                continue
            days_left = (e.served.not_after - now) / 86400
            crossed = [t for t in (*self.settings.reminder_days, EXPIRED) if days_left <= t]
            if not crossed:
                continue
            threshold = min(crossed)
            key = f"{e.served.cert_sha256}:{threshold}"
            if key in self.sent:
                continue
            out.append(
                {
                    "event": "certificate_expired"
                    if threshold == EXPIRED
                    else "certificate_expiring",
                    "domain": e.domain,
                    "threshold_days": threshold,
                    "days_left": round(days_left, 1),
                    "not_after": dt.datetime.fromtimestamp(e.served.not_after, dt.UTC).isoformat(),
                    "cert_sha256": e.served.cert_sha256,
                    "_keys": [f"{e.served.cert_sha256}:{t}" for t in crossed],
                }
            )
        return out

    async def check(self, entries: Iterable[Entry], now: float | None = None) -> int:
        """Send what is due; returns how many reminders went out."""
        sent = 0
        for reminder in self.due(entries, now if now is not None else time.time()):
            keys = reminder.pop("_keys")
            reload_log.warning(
                "certificate for %s %s",
                reminder["domain"],
                "has expired"
                if reminder["threshold_days"] == EXPIRED
                else f"expires in {reminder['days_left']} days",
                extra=reminder,
            )
            try:
                await self._send(reminder)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reload_log.warning(
                    "expiry reminder for %s not delivered: %s; will retry",
                    reminder["domain"],
                    exc,
                    extra={"domain": reminder["domain"]},
                )
                continue
            stamp = time.time()
            for key in keys:  # thresholds already passed are covered by this one
                self.sent[key] = stamp
            sent += 1
        if sent:
            await asyncio.to_thread(
                atomic_write, self.ledger_file, json.dumps({"sent": self.sent}).encode()
            )
        return sent

    async def _post(self, reminder: dict[str, Any]) -> None:
        if not self.settings.webhook_url:
            return
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(self.settings.webhook_url, json=reminder) as resp:
                if resp.status >= 300:
                    raise aiohttp.ClientResponseError(
                        resp.request_info,
                        (),
                        status=resp.status,
                        message=f"webhook answered {resp.status}",
                    )


async def run_notifier(
    notifier: ExpiryNotifier,
    entries: Callable[[], list[Entry]],
    ready: Callable[[], bool],
    stop: asyncio.Event,
    nudge: asyncio.Event,
    interval: float,
) -> None:
    """Check once certificates are synced, after every change (`nudge`), and every
    `interval` seconds (a certificate crosses a threshold without any change)."""
    while not stop.is_set():
        if ready():
            await notifier.check(entries())
        nudge.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(nudge.wait())]
        await asyncio.wait(
            waits, timeout=interval if ready() else 0.5, return_when=asyncio.FIRST_COMPLETED
        )
        for w in waits:
            w.cancel()
