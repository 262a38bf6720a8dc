"""Config parsing: defaults, env overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config import Address, load_settings, settings_from_dict
from edgeproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_documented_default_config_loads_and_matches_builtin_defaults():
    """conf/edgeproxy.toml documents the defaults: loading it changes nothing."""
    assert load_settings(ROOT / "conf" / "edgeproxy.toml", env={}) == load_settings(None, env={})


def test_defaults():
    s = settings_from_dict({})
    assert s.server.listen == (Address("0.0.0.0", 443),)
    assert [r.prefix for r in s.routes] == ["/track", "/chat", "/collection", "/general"]
    assert [r.prefix for r in s.routes if r.long_lived] == ["/chat"]
    assert s.server.max_body_bytes == 1048576


def test_env_overrides_single_keys():
    s = load_settings(
        None,
        env={
            "EDGEPROXY_SERVER_WORKERS": "3",
            "EDGEPROXY_SERVER_LISTEN": '["[::1]:8443"]',
            "EDGEPROXY_CERTS_DIR": "/srv/certs",
        },
    )
    assert s.server.workers == 3
    assert s.server.listen == (Address("::1", 8443),)
    assert s.certs.dir == Path("/srv/certs")


def test_workers_zero_means_one_per_core():
    import os

    assert settings_from_dict({"server": {"workers": 0}}).server.worker_count == os.cpu_count()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"server": {"workers": "two"}}, r"server\.workers: expected an integer"),
        ({"server": {"workers": -1}}, r"server\.workers"),
        ({"server": {"listen": ["nonsense"]}}, r"server\.listen: 'nonsense' is not host:port"),
        ({"server": {"listen": []}}, r"server\.listen: at least one"),
        ({"server": {"lisen": ["a:1"]}}, r"server\.lisen: unknown key"),
        ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, r"server\.trusted_proxies"),
        ({"server": {"max_body_bytes": 0}}, r"server\.max_body_bytes: must be greater than 0"),
        ({"routes": {"/admin": ["http://a"]}}, r'routes\."/admin": only the tracker routes'),
        ({"routes": {"/track": ["ftp://a"]}}, r'routes\."/track": .* is not an http'),
        ({"routes": {"/track": []}}, r'routes\."/track": list at least one'),
        ({"routes": {"/track/": ["http://a"]}}, r"trailing slash"),
        (
            {"routes": {"/track": "http://a"}, "proxy": {"long_lived_routes": ["/chat"]}},
            r"proxy\.long_lived_routes: '/chat' is not a key",
        ),
        ({"proxy": {"response_timeout": "10s"}}, r"proxy\.response_timeout: expected a number"),
        ({"log": {"level": "loud"}}, r"log\.level"),
        ({"nosuch": {}}, r"nosuch: unknown section"),
    ],
)
def test_bad_settings_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        settings_from_dict(raw)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "none.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(bad, env={})


def test_settings_are_frozen():
    s = settings_from_dict({})
    with pytest.raises(AttributeError):
        s.server.workers = 4  # type: ignore[misc]
