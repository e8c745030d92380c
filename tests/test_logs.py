"""Logs: the repeat limit (pure, fake times), JSON lines, and the serve command's output."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from conftest import guardntp_server

from guardntp.logs import (
    MAX_KEYS,
    SUMMARY_ATTRIBUTE,
    JsonFormatter,
    LogSettings,
    LogSetup,
    RepeatLimiter,
)

KEY = ("guardntp.server", logging.DEBUG, "sendto %s: %s")


def test_limiter_passes_the_first_n_then_counts_and_reports_once_the_window_ends() -> None:
    limiter = RepeatLimiter(limit=3, interval_s=10.0)
    results = [limiter.check(KEY, 100.0 + i * 0.01, lambda: "sendto x: refused")
               for i in range(50)]
    assert [allowed for allowed, _ in results] == [True] * 3 + [False] * 47
    assert all(not due for _, due in results)
    assert limiter.suppressed_total == 47
    allowed, due = limiter.check(KEY, 110.0, lambda: "later")
    assert allowed
    assert [(d.count, d.example) for d in due] == [(47, "sendto x: refused")]


def test_expire_reports_windows_that_ended_quietly_and_forgets_them() -> None:
    limiter = RepeatLimiter(limit=1, interval_s=5.0)
    other = ("guardntp", logging.INFO, "something else")
    for i in range(4):
        limiter.check(KEY, 1.0 + i, lambda: "m")
    limiter.check(other, 1.0, lambda: "o")
    assert limiter.expire(5.9) == []            # windows still open
    due = limiter.expire(6.0)
    assert [(d.key, d.count) for d in due] == [(KEY, 3)]  # `other` had nothing held back
    assert limiter.windows == {}


def test_keys_are_bounded_even_if_every_message_is_different() -> None:
    limiter = RepeatLimiter(limit=2, interval_s=60.0)
    passed = sum(limiter.check(("x", 20, f"message {i}"), 1.0, lambda: "t")[0]
                 for i in range(MAX_KEYS + 500))
    assert len(limiter.windows) <= MAX_KEYS
    # The first MAX_KEYS - 1 distinct keys pass; the rest share one key of 2 per window.
    assert passed == MAX_KEYS - 1 + 2


def _logger_with(stream: io.StringIO, settings: LogSettings) -> tuple[logging.Logger, LogSetup]:
    setup = LogSetup(settings, stream=stream)
    logger = logging.getLogger("guardntp.test-flood")
    logger.propagate = False
    logger.handlers = [setup.handler]
    logger.setLevel(logging.DEBUG)
    return logger, setup


def test_a_flood_of_log_calls_yields_a_bounded_number_of_lines() -> None:
    stream = io.StringIO()
    logger, setup = _logger_with(stream, LogSettings(repeat_limit=5, repeat_interval_s=3600))
    for i in range(20_000):
        logger.warning("bad packet from %s", f"192.0.2.{i % 250}")
    logger.error("a different problem")
    setup.repeat_filter.flush_expired(now=10**10)  # far in the future: every window ended
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 + 1 + 1
    assert "suppressed 19995 messages like 'bad packet from 192.0.2.5'" in lines[-1]
    assert setup.suppressed_total == 19995


def test_json_lines_carry_level_logger_message_and_the_suppressed_count() -> None:
    stream = io.StringIO()
    logger, setup = _logger_with(stream, LogSettings(format="json", repeat_limit=1,
                                                     repeat_interval_s=3600))
    logger.info("served %d clients", 3)
    logger.info("served %d clients", 4)
    setup.repeat_filter.flush_expired(now=10**10)
    first, summary = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "info" and first["logger"] == "guardntp.test-flood"
    assert first["message"] == "served 3 clients"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert summary["suppressed"] == 1 and "served 4 clients" in summary["message"]


def test_json_formatter_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("guardntp", logging.ERROR, __file__, 1, "failed", (), None)
        import sys
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]
    assert SUMMARY_ATTRIBUTE not in entry


def test_apply_changes_level_and_limits_in_place() -> None:
    stream = io.StringIO()
    logger, setup = _logger_with(stream, LogSettings())
    root = logging.getLogger()
    saved = root.level
    try:
        setup.apply(LogSettings(level="error", repeat_limit=2, repeat_interval_s=7.0))
        assert root.level == logging.ERROR
        assert setup.repeat_filter.limiter.limit == 2
        assert setup.repeat_filter.limiter.interval_s == 7.0
    finally:
        root.setLevel(saved)


def test_serve_logs_json_lines_when_asked(tmp_path: Path) -> None:
    with guardntp_server(tmp_path, "--log-format", "json") as server:
        pass
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is JSON
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("guardntp ") and "serving" in message
               for message in messages)
    assert any(message.startswith("stopped:") for message in messages)
