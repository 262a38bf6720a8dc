"""`edgeproxy domains ...` and `edgeproxy doctor`: tables for people, --json for scripts."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

from edgeproxy.admin.client import AdminClient, ApiError
from edgeproxy.errors import ConfigError

_LEVELS = {"ok": "ok  ", "info": "info", "warning": "WARN", "error": "FAIL"}


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ("domain", "status", "days_left", "not_after")
    data = [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [
        max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)) for d in data]
    return "\n".join(lines)


def _show(doc: dict[str, Any]) -> str:
    lines = [f"{k:<19} {v}" for k, v in doc.items() if k not in ("errors", "warnings")]
    lines += [f"error               {e}" for e in doc.get("errors", [])]
    lines += [f"warning             {w}" for w in doc.get("warnings", [])]
    return "\n".join(lines)


def _q(name: str) -> str:
    # A name is a path segment: "..", "/" or "%2e" must reach the API as data, not as a path.
    return quote(name, safe="")


def run_admin_command(args: argparse.Namespace) -> int:
    client = AdminClient.from_options(args.admin_url, args.token_file)
    try:
        return _run(client, args)
    except ApiError as exc:
        if args.json:
            print(json.dumps(exc.doc, indent=2))
        else:
            print(f"edgeproxy: {exc.message}")
            for hint in exc.doc.get("hints", []):
                print(f"  fix: {hint}")
        return 1


def _run(client: AdminClient, args: argparse.Namespace) -> int:
    if args.command == "doctor":
        doc = client.call("GET", f"/v1/domains/{_q(args.domain)}/check")
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            for f in doc["findings"]:
                print(f"[{_LEVELS.get(f['level'], f['level'])}] {f['check']:<6} {f['message']}")
                if f.get("fix") and f["level"] != "ok":
                    print(f"              fix: {f['fix']}")
        return 0 if doc["ok"] else 1
    verb = args.verb
    if verb == "list":
        doc = client.call("GET", "/v1/domains")
        print(json.dumps(doc, indent=2) if args.json else _table(doc["domains"]))
        return 0
    if verb == "show":
        doc = client.call("GET", f"/v1/domains/{_q(args.domain)}")
    elif verb == "add":
        doc = client.call("POST", "/v1/domains", {"domain": args.domain})
    elif verb == "remove":
        client.call("DELETE", f"/v1/domains/{_q(args.domain)}")
        doc = {"domain": args.domain, "status": "removed"}
    elif verb == "upload":
        try:
            body = {"fullchain": args.fullchain.read_text(), "privkey": args.key.read_text()}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the bundle: {exc}") from exc
        doc = client.call("PUT", f"/v1/domains/{_q(args.domain)}/certificate", body)
        deadline = time.monotonic() + 10
        while (
            args.wait
            and doc["status"] in ("validating", "preparing")
            and (time.monotonic() < deadline)
        ):
            time.sleep(0.1)
            doc = client.call("GET", f"/v1/domains/{_q(args.domain)}")
    else:  # pragma: no cover - argparse limits the verbs
        raise AssertionError(verb)
    print(json.dumps(doc, indent=2) if args.json else _show(doc))
    return 0
