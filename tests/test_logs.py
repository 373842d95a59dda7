"""Logging setup: text and JSON formats, the SDK warning gate (counted, one line a minute)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import pytest

from mproxy import logs
from mproxy.stats import Stats


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root, sdk = logging.getLogger(), logging.getLogger(logs.SDK_LOGGER)
    saved = (root.level, list(root.handlers), sdk.level, list(sdk.handlers), sdk.propagate)
    yield
    for logger, handler in logs._installed:
        logger.removeHandler(handler)
        handler.close()
    logs._installed.clear()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    sdk.setLevel(saved[2])
    sdk.handlers[:] = saved[3]
    sdk.propagate = saved[4]


def test_text_format(tmp_path: Path) -> None:
    path = tmp_path / "mproxy.log"
    logs.setup_logging("info", "text", str(path))
    logging.getLogger("mproxy.server").info("listening on %s", "127.0.0.1:11211")
    logging.getLogger("mproxy.server").debug("not shown")
    [line] = path.read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mproxy\.server: listening on 127\.0\.0\.1:11211", line)


def test_a_worker_marks_its_lines(tmp_path: Path) -> None:
    text, js = tmp_path / "text.log", tmp_path / "json.log"
    logs.setup_logging("info", "text", str(text), worker=2)
    logging.getLogger("mproxy").info("configuration reloaded")
    logs.setup_logging("info", "json", str(js), worker=2)
    logging.getLogger("mproxy").info("configuration reloaded")
    [line] = text.read_text().splitlines()
    assert line.endswith(" INFO [worker 2] mproxy: configuration reloaded")
    record = json.loads(js.read_text())
    assert (record["worker"], record["logger"], record["message"]) == (2, "mproxy", "configuration reloaded")


def test_json_format_and_set_level(tmp_path: Path) -> None:
    path = tmp_path / "mproxy.log"
    logs.setup_logging("warning", "json", str(path))
    log = logging.getLogger("mproxy.cli")
    log.info("hidden")
    logs.set_level("DEBUG")
    log.debug("reloaded %d", 1)
    [line] = path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "DEBUG"
    assert entry["logger"] == "mproxy.cli"
    assert entry["message"] == "reloaded 1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


def test_setup_twice_replaces_handlers(tmp_path: Path) -> None:
    logs.setup_logging("info", "text", str(tmp_path / "one.log"))
    logs.setup_logging("info", "text", str(tmp_path / "two.log"))
    logging.getLogger("mproxy").info("once")
    assert (tmp_path / "one.log").read_text() == ""
    assert len((tmp_path / "two.log").read_text().splitlines()) == 1
    gates = [h for h in logging.getLogger(logs.SDK_LOGGER).handlers if isinstance(h, logs.SdkWarningGate)]
    assert len(gates) == 1


def test_sdk_warnings_counted_and_rate_limited_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "mproxy.log"
    stats = Stats()
    logs.setup_logging("warning", "text", str(path), stats=stats)
    sdk = logging.getLogger(logs.SDK_LOGGER)
    for i in range(500):
        sdk.warning("Get failed with exception: %d", i)
    sdk.error("shown")
    assert stats.sdk_warnings == 500
    assert stats.snapshot()["sdk_warnings"] == 500
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING momentosdk: Get failed with exception: 0")
    assert lines[1].endswith("ERROR momentosdk: shown")


def test_sdk_warnings_counted_above_their_level(tmp_path: Path) -> None:
    path = tmp_path / "mproxy.log"
    stats = Stats()
    logs.setup_logging("error", "text", str(path), stats=stats)
    logging.getLogger(logs.SDK_LOGGER).warning("Set failed")
    assert stats.sdk_warnings == 1
    assert path.read_text() == ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_gate_lets_one_warning_a_minute_through() -> None:
    stats = Stats()
    clock = Clock()
    collect = Collect()
    root = logging.getLogger()
    root.handlers[:] = [collect]
    root.setLevel(logging.INFO)
    sdk = logging.getLogger("momentosdk.gate-test")
    sdk.propagate = False
    sdk.setLevel(logging.DEBUG)
    gate = logs.SdkWarningGate(stats, interval=60.0, clock=clock)
    sdk.addHandler(gate)
    try:
        for i in range(100):
            sdk.warning("Get failed %d", i)
        assert collect.messages == ["Get failed 0"]
        clock.now += 59.0
        sdk.warning("still held")
        assert len(collect.messages) == 1
        clock.now += 1.0
        sdk.warning("Get failed again")
        assert collect.messages[1].startswith("Get failed again [100 more momentosdk warnings")
        sdk.info("info passes")
        sdk.debug("debug is below the root level")
        assert collect.messages[2:] == ["info passes"]
        assert stats.sdk_warnings == 102
    finally:
        sdk.removeHandler(gate)
