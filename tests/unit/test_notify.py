"""Expiry reminders: thresholds, once per (certificate, threshold), across restarts."""

from __future__ import annotations

import time

from edgeproxy.config import NotifySettings
from edgeproxy.notify import ExpiryNotifier
from edgeproxy.tls.registry import Entry, Served

DAY = 86400.0


def _entry(domain: str, days_left: float, sha: str, now: float) -> Entry:
    return Entry(domain, Served("v1", now + days_left * DAY, sha, "spki", now))


async def test_most_urgent_threshold_once_and_never_again(tmp_path):
    now = time.time()
    sent: list[dict] = []

    async def send(doc: dict) -> None:
        sent.append(doc)

    ledger = tmp_path / "notified.json"
    n = ExpiryNotifier(NotifySettings(), ledger, send)
    entries = [_entry("t.a.test", 20, "aa", now), _entry("t.b.test", 90, "bb", now)]
    assert await n.check(entries, now) == 1
    assert [(d["domain"], d["threshold_days"], d["event"]) for d in sent] == [
        ("t.a.test", 30, "certificate_expiring")
    ]
    assert await n.check(entries, now) == 0  # same certificate, same threshold
    again = ExpiryNotifier(NotifySettings(), ledger, send)  # a restart
    assert await again.check(entries, now) == 0
    assert await again.check(entries, now + 7 * DAY) == 1  # now 13 days left: the 14-day one
    assert sent[-1]["threshold_days"] == 14
    assert await again.check(entries, now + 21 * DAY) == 1
    assert sent[-1]["event"] == "certificate_expired"


async def test_a_renewed_certificate_starts_over(tmp_path):
    now = time.time()
    sent: list[dict] = []

    async def send(doc: dict) -> None:
        sent.append(doc)

    n = ExpiryNotifier(NotifySettings(), tmp_path / "l.json", send)
    await n.check([_entry("t.a.test", 50, "old", now)], now)
    await n.check([_entry("t.a.test", 50, "new", now)], now)
    assert [d["cert_sha256"] for d in sent] == ["old", "new"]


async def test_a_failed_delivery_is_retried(tmp_path):
    now = time.time()
    calls = 0

    async def flaky(doc: dict) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("webhook down")

    n = ExpiryNotifier(NotifySettings(), tmp_path / "l.json", flaky)
    e = [_entry("t.a.test", 5, "aa", now)]
    assert await n.check(e, now) == 0
    assert await n.check(e, now) == 1
    assert await n.check(e, now) == 0
