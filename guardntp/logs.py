"""Log output for ``guardntp serve``: concise, rate-limited, text or JSON.

Rule: a flood must never flood the log. Every record passes a
:class:`RepeatLimiter` keyed by (logger, level, message template): the first
``repeat_limit`` records of a key in each ``repeat_interval_s`` window go out,
later ones are counted, and when the window ends one line says how many were
suppressed. The template (``record.msg``), not the formatted text, is the key,
so "sendto %s failed" from a million spoofed addresses is one key, not a million.
:class:`RepeatLimiter` is pure (time is the record's ``created``); the handler
set-up at the bottom is the edge.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

#: Defaults for ``[log]``: ten lines of one kind a minute say all there is to say.
DEFAULT_REPEAT_LIMIT = 10
DEFAULT_REPEAT_INTERVAL_S = 60.0
#: Distinct keys tracked at once; more (only from templates built with f-strings,
#: a bug) share one key so the limiter's own memory stays bounded.
MAX_KEYS = 1024
_OVERFLOW_KEY = ("guardntp.logs", logging.WARNING, "(other messages)")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
#: Attribute set on our own "suppressed K messages" records so they always pass.
SUMMARY_ATTRIBUTE = "guardntp_suppressed"

Key = tuple[str, int, str]


@dataclass
class _Window:
    started: float
    passed: int = 0
    suppressed: int = 0
    example: str = ""   # the first suppressed message, formatted, for the summary


@dataclass(frozen=True, slots=True)
class Suppressed:
    """``count`` records of ``key`` were held back in the window that just ended."""

    key: Key
    count: int
    example: str
    interval_s: float


class RepeatLimiter:
    """Per key, at most ``limit`` records per ``interval_s`` window (pure)."""

    def __init__(self, limit: int = DEFAULT_REPEAT_LIMIT,
                 interval_s: float = DEFAULT_REPEAT_INTERVAL_S) -> None:
        self.limit = limit
        self.interval_s = interval_s
        self.windows: dict[Key, _Window] = {}
        self.suppressed_total = 0

    def check(self, key: Key, now: float, text: Callable[[], str]) -> tuple[bool, list[Suppressed]]:
        """May a record of ``key`` at ``now`` go out? Also the summaries now due for it.

        ``text`` formats the record; it is called only for the first suppressed one.
        """
        due: list[Suppressed] = []
        if key not in self.windows and self._full():
            due = self.expire(now)
            if self._full():
                key = _OVERFLOW_KEY
        window = self.windows.get(key)
        if window is None or now - window.started >= self.interval_s:
            if window is not None and window.suppressed:
                due.append(self._summary(key, window))
            window = self.windows[key] = _Window(now)
        if window.passed < self.limit:
            window.passed += 1
            return True, due
        if not window.suppressed:
            window.example = text()
        window.suppressed += 1
        self.suppressed_total += 1
        return False, due

    def _full(self) -> bool:
        # One place is kept for the shared overflow key.
        return len(self.windows) - (_OVERFLOW_KEY in self.windows) >= MAX_KEYS - 1

    def expire(self, now: float) -> list[Suppressed]:
        """Close every window that has ended: summaries for those that held records back."""
        due = []
        for key, window in list(self.windows.items()):
            if now - window.started >= self.interval_s:
                if window.suppressed:
                    due.append(self._summary(key, window))
                del self.windows[key]
        return due

    def _summary(self, key: Key, window: _Window) -> Suppressed:
        return Suppressed(key, window.suppressed, window.example, self.interval_s)


class RepeatFilter(logging.Filter):
    """A handler filter around :class:`RepeatLimiter`; summaries go to ``emit``."""

    def __init__(self, limiter: RepeatLimiter, emit: Callable[[logging.LogRecord], object]
                 ) -> None:
        super().__init__()
        self.limiter = limiter
        self.emit = emit

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, SUMMARY_ATTRIBUTE, None) is not None:
            return True
        key = (record.name, record.levelno, str(record.msg))
        allowed, due = self.limiter.check(key, record.created, record.getMessage)
        for summary in due:
            self.emit(summary_record(summary))
        return allowed

    def flush_expired(self, now: float | None = None) -> None:
        """Report windows that ended with nothing more logged (called from a timer)."""
        for summary in self.limiter.expire(time.time() if now is None else now):
            self.emit(summary_record(summary))


def summary_record(summary: Suppressed) -> logging.LogRecord:
    name, level, _template = summary.key
    record = logging.LogRecord(
        name, level, __file__, 0,
        "suppressed %d messages like %r in %g s", (summary.count, summary.example,
                                                  summary.interval_s), None)
    setattr(record, SUMMARY_ATTRIBUTE, summary.count)
    return record


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        suppressed = getattr(record, SUMMARY_ATTRIBUTE, None)
        if suppressed is not None:
            entry["suppressed"] = suppressed
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# ---------------------------------------------------------------------------- the edge

@dataclass(frozen=True)
class LogSettings:
    format: str = "text"
    level: str = "info"
    repeat_limit: int = DEFAULT_REPEAT_LIMIT
    repeat_interval_s: float = DEFAULT_REPEAT_INTERVAL_S

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> LogSettings:
        """From the checked ``[log]`` table (``Config.extra["log"]``)."""
        known = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def text_formatter(environ: Mapping[str, str] = os.environ) -> logging.Formatter:
    # Under systemd the journal stamps each line itself; a second timestamp is noise.
    if environ.get("JOURNAL_STREAM"):
        return logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class LogSetup:
    """The serve command's log handler; :meth:`apply` takes new settings (reload)."""

    def __init__(self, settings: LogSettings, stream: TextIO | None = None,
                 level_override: str | None = None) -> None:
        self.handler = logging.StreamHandler(stream or sys.stderr)
        self._replaced: list[logging.Handler] = []
        self._previous_level = logging.getLogger().level
        self.level_override = level_override
        self.repeat_filter = RepeatFilter(RepeatLimiter(), self.handler.handle)
        self.handler.addFilter(self.repeat_filter)
        self.settings = settings
        self.apply(settings)

    def apply(self, settings: LogSettings) -> None:
        self.settings = settings
        self.handler.setFormatter(JsonFormatter() if settings.format == "json"
                                  else text_formatter())
        limiter = self.repeat_filter.limiter
        limiter.limit = settings.repeat_limit
        limiter.interval_s = settings.repeat_interval_s
        logging.getLogger().setLevel(LEVELS[self.level_override or settings.level])

    def install(self) -> LogSetup:
        """Replace the plain stderr handler ``logging.basicConfig`` put on the root logger."""
        root = logging.getLogger()
        self._replaced = [h for h in root.handlers if type(h) is logging.StreamHandler]
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self.handler)
        return self

    def uninstall(self) -> None:
        """Put back what :meth:`install` replaced (the root level included)."""
        root = logging.getLogger()
        root.removeHandler(self.handler)
        for handler in self._replaced:
            root.addHandler(handler)
        root.setLevel(self._previous_level)

    @property
    def suppressed_total(self) -> int:
        return self.repeat_filter.limiter.suppressed_total
