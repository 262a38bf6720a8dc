from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge import Edge, free_port
from tests.support.upstream import AiohttpUpstream, RawUpstream


def base_config(
    certs_dir: Path, upstream: RawUpstream, chat: AiohttpUpstream, trust_bundle: Path
) -> dict:
    return {
        "server": {
            "workers": 1,
            "handshake_timeout": 2.0,
            "header_timeout": 2.0,
            "max_body_bytes": 65536,
            "drain_timeout": 10.0,
        },
        "certs": {"dir": str(certs_dir), "trust_bundle": str(trust_bundle)},
        "routes": {
            "/track": [upstream.url],
            "/collection": [upstream.url],
            "/general": [upstream.url],
            "/chat": [chat.url],
            # the first URL refuses connections: one retry on the second must save the request
            "/collection/retry": [f"http://127.0.0.1:{free_port()}", upstream.url],
            "/general/dead": [f"http://127.0.0.1:{free_port()}"],
        },
        "proxy": {"response_timeout": 1.5, "connect_timeout": 1.0, "long_lived_idle_timeout": 40.0},
        "policy": {"legacy_cookies": ["krt.vis"], "upstream_cookies": ["tracker"]},
    }


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
    certs_dir: Path,
    upstream: RawUpstream,
    chat_upstream: AiohttpUpstream,
    trust_bundle: Path,
) -> Iterator[Edge]:
    config = base_config(certs_dir, upstream, chat_upstream, trust_bundle)
    e = Edge(tmp_path_factory.mktemp("edge"), config)
    e.start()
    yield e
    assert e.stop() == 0
    assert "Traceback" not in e.stderr(), e.stderr()
