"""Backends, chosen by name from a closed table and imported lazily
(so that the memory backend never imports grpc or momento)."""

from __future__ import annotations

import importlib
from typing import Any

from mproxy.backends.base import Backend

#: name -> "module:factory". A factory takes (cache_config, proxy_config, **kw).
BACKENDS: dict[str, str] = {
    "memory": "mproxy.backends.memory:from_config",
    "momento": "mproxy.backends.momento:from_config",
}


def create(name: str, *args: Any, **kwargs: Any) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(*args, **kwargs)
