"""Secrets stay secret: the API key never reaches an output, values never reach a log.

Unit tests here; the whole process run with a recognisable fake key is
``tests/test_security_e2e.py``.
"""

from __future__ import annotations

import pytest

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
