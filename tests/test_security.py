"""Secrets stay secret: the API key never reaches an output, values never reach a log.

Unit tests here; the whole process run with a recognisable fake key is
``tests/test_security_e2e.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mproxy import config as cfg
from mproxy.backends.base import BackendError
from mproxy.backends.momento.endpoint import credentials_from_env

#: A recognisable secret: if any output holds it, a test says where.
GARBAGE_KEY = "not-a-momento-key-MPROXY-SECRET-4f1d"


@pytest.mark.parametrize("endpoint", ["", "cell-1.example"])
def test_a_garbage_key_is_named_as_such_and_not_echoed(endpoint: str) -> None:
    with pytest.raises(BackendError) as err:
        credentials_from_env("MOMENTO_API_KEY", endpoint, environ={"MOMENTO_API_KEY": GARBAGE_KEY})
    message = str(err.value)
    assert "MPROXY-SECRET" not in message and GARBAGE_KEY[:10] not in message
    if endpoint:
        assert message == (
            "MOMENTO_API_KEY does not hold a Momento v2 API key, which [momento] endpoint expects "
            "(v1 keys and legacy tokens carry their endpoint: leave endpoint empty for them)"
        )
    else:
        assert message == (
            "MOMENTO_API_KEY does not hold a Momento API key (neither a v1 key nor a legacy token); "
            "a v2 key also needs [momento] endpoint"
        )


# -- a key in the configuration file -------------------------------------------------------

#: A fake key of the shape every Momento key has (base64 JSON, so it starts "eyJ").
FILE_KEY = "eyJlbmRwb2ludCI6ICJjZWxsLmV4YW1wbGUiLCAiYXBpX2tleSI6ICJNUFJPWFktU0VDUkVUIn0="


def write(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text + '[[cache]]\ncache_name = "c"\n')
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f'[momento]\napi_key_env = "{FILE_KEY}"\n', "momento.api_key_env"),
        (f'[momento]\nendpoint = " {FILE_KEY}\\n"\n', "momento.endpoint"),
        (f'[debug]\nlog_file = "{FILE_KEY}"\n', "debug.log_file"),
        (f'[[cache]]\ncache_name = "{FILE_KEY}"\nport = 11212\n', "cache[1].cache_name"),
    ],
)
def test_a_key_in_a_known_key_is_refused_and_not_shown(text: str, key: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.loads('[[cache]]\ncache_name = "c"\n' + text, "p.toml")
    assert err.value.key == key
    assert str(err.value).startswith(f"p.toml: {key} = <what looks like a Momento API key, not shown>: expected ")
    assert FILE_KEY[:12] not in str(err.value) and "MPROXY" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (f'[momento]\napi_key = "{FILE_KEY}"\n', "momento.api_key"),
        (f'MOMENTO_API_KEY = "{FILE_KEY}"\n', "MOMENTO_API_KEY"),
        (f'[secrets]\nkeys = ["x", "{FILE_KEY}"]\n', "secrets.keys[1]"),
    ],
)
def test_a_key_in_an_ignored_key_warns_when_others_may_read_the_file(tmp_path: Path, text: str, where: str) -> None:
    warning = f"looks like a Momento API key ({where}): delete it from the file"
    for mode, warned in ((0o644, "others (mode 0644)"), (0o604, "others (mode 0604)"), (0o600, ""), (0o400, "")):
        loaded = cfg.load(write(tmp_path, text, mode))
        found = [w for w in loaded.warnings if warning in w]
        assert found == ([f"{tmp_path}/proxy.toml is readable by {warned} and holds what {warning} "
                          "(mproxy reads the key from the environment only, and ignores it there)"] if warned else [])
        assert all(FILE_KEY[:12] not in w for w in loaded.warnings)
    os.chmod(tmp_path / "proxy.toml", 0o640)
    group = [w for w in cfg.load(tmp_path / "proxy.toml").warnings if warning in w]
    assert group == [] if os.stat(tmp_path / "proxy.toml").st_uid == 0 else "its group (mode 0640)" in group[0]
    assert not any(warning in w for w in cfg.loads(text + '[[cache]]\ncache_name = "c"\n').warnings)  # no file read


def test_an_environment_variable_name_is_no_secret(tmp_path: Path) -> None:
    loaded = cfg.load(write(tmp_path, '[momento]\napi_key_env = "MY_MOMENTO_KEY"\nendpoint = "cell-1.example"\n', 0o644))
    assert loaded.warnings == () and loaded.momento.api_key_env == "MY_MOMENTO_KEY"
