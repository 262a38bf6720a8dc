"""The command line: a thin layer that parses flags, calls the library, maps errors to exits.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from edgeproxy import __version__
from edgeproxy.errors import EdgeProxyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeproxy", description=__doc__)
    p.add_argument("--version", action="version", version=f"edgeproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the edge in the foreground")
    serve.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (default: built-in defaults)"
    )
    serve.add_argument(
        "--workers", type=int, default=None, help="override server.workers (0 = one per CPU core)"
    )

    check = sub.add_parser("check-config", help="validate a config file and print it as JSON")
    check.add_argument("--config", type=Path, required=True)

    demo = sub.add_parser("demo", help="run the edge on an embedded default (demo CA + backend)")
    demo.add_argument("--state-dir", type=Path, default=Path(".demo"))
    demo.add_argument("--port", type=int, default=8443)
    demo.add_argument("--backend-port", type=int, default=8081)
    demo.add_argument("--metrics-port", type=int, default=9100)

    cert = sub.add_parser("cert", help="certificate tools").add_subparsers(
        dest="cert_command", required=True
    )
    check_cert = cert.add_parser(
        "check", help="check a bundle against the registration rules (offline)"
    )
    check_cert.add_argument(
        "--domain", required=True, help="the registered host, e.g. t.example.com"
    )
    check_cert.add_argument("--fullchain", type=Path, required=True)
    check_cert.add_argument("--key", type=Path, required=True)
    check_cert.add_argument(
        "--trust-bundle", type=Path, default=None, help="extra PEM roots (private CAs)"
    )
    check_cert.add_argument(
        "--certs-dir",
        type=Path,
        default=None,
        help="registered domains whose keys this one must not reuse",
    )
    check_cert.add_argument("--json", action="store_true", help="machine-readable verdict")

    api = argparse.ArgumentParser(add_help=False)
    api.add_argument(
        "--admin-url",
        default=None,
        help="admin API base URL (default: $EDGEPROXY_ADMIN_URL or http://127.0.0.1:9200)",
    )
    api.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="admin token file (default: $EDGEPROXY_ADMIN_TOKEN or conf/admin.token)",
    )
    api.add_argument("--json", action="store_true", help="print the API's JSON")
    domains = sub.add_parser("domains", help="the domain lifecycle, through the admin API")
    verbs = domains.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", parents=[api], help="every domain and its status")
    for verb, text in (
        ("show", "one domain's status"),
        ("add", "register a domain"),
        ("remove", "remove a domain (stops serving it)"),
    ):
        verbs.add_parser(verb, parents=[api], help=text).add_argument("domain")
    up = verbs.add_parser("upload", parents=[api], help="upload a certificate chain and key")
    up.add_argument("domain")
    up.add_argument("--fullchain", type=Path, required=True)
    up.add_argument("--key", type=Path, required=True)
    up.add_argument("--wait", action="store_true", help="wait until the status is active")
    doctor = sub.add_parser(
        "doctor", parents=[api], help="find what is wrong with a domain (DNS, TLS, routes)"
    )
    doctor.add_argument("domain")

    backend = sub.add_parser("demo-backend", help="run only the demo tracking backend")
    backend.add_argument("--port", type=int, default=8081)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except EdgeProxyError as exc:
        print(f"edgeproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from edgeproxy.config import load_settings

    if args.command == "serve":
        import os

        env = dict(os.environ)
        if args.workers is not None:
            env["EDGEPROXY_SERVER_WORKERS"] = str(args.workers)
        settings = load_settings(args.config, env)
        from edgeproxy.workers import serve

        return serve(settings)
    if args.command == "check-config":
        settings = load_settings(args.config)
        print(json.dumps(asdict(settings), default=str, indent=2))
        return 0
    if args.command == "demo":
        from edgeproxy.demo import run_demo

        return run_demo(args.state_dir, args.port, args.backend_port, args.metrics_port)
    if args.command == "cert":
        from edgeproxy.certcheck import check_files

        return check_files(
            args.domain,
            args.fullchain,
            args.key,
            trust_bundle=args.trust_bundle,
            certs_dir=args.certs_dir,
            as_json=args.json,
        )
    if args.command in ("domains", "doctor"):
        from edgeproxy.admin.cli import run_admin_command

        return run_admin_command(args)
    if args.command == "demo-backend":
        from edgeproxy.demo import run_backend

        return run_backend(args.port)
    raise AssertionError(args.command)
