"""Where the served time comes from (the ``--clock`` choice).

Rule: a time source is edge code. It may read clocks, call the kernel, run
``chronyc`` or talk to upstream servers, and it hands the pure code one
immutable :class:`~guardntp.clock.ClockState` per call of :meth:`TimeSource.state`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

from ..clock import ClockState
from ..config import ClockConfig
from ..wire import refid_bytes, refid_to_text


class TimeSource(Protocol):
    name: str

    def start(self) -> None:
        """Begin any background work (upstream polling); idempotent."""

    def stop(self) -> None:
        """End background work."""

    def state(self, now_ns: int) -> ClockState:
        """The clock's quality now. Cheap: the server calls it several times a second."""
        ...


CLOCK_CHOICES = ("system", "upstream", "local")


def sync_change(was_synchronized: bool | None, state: ClockState) -> tuple[int, str] | None:
    """The log record (level, message) a reading deserves, or None (pure).

    Only changes are logged: replies go LI=3 silently otherwise, and a line per
    refresh (several a second) would bury everything else. ``None`` for
    ``was_synchronized`` is the first reading: it is logged only when
    unsynchronised, since the start-up line already names the clock.
    """
    if state.synchronized == was_synchronized:
        return None
    if not state.synchronized:
        return logging.WARNING, (
            f"{state.source} clock NOT synchronised ({state.detail}): replies carry "
            "leap indicator 3 (alarm) and stratum 0, so clients will not take our time")
    if was_synchronized is None:
        return None
    return logging.INFO, (
        f"{state.source} clock synchronised again ({state.detail}): serving stratum "
        f"{state.wire_stratum}, refid {refid_to_text(state.refid, state.wire_stratum)}, "
        f"leap {state.wire_leap.name.lower()}")


class SyncWatch:
    """Logs a time source's changes between synchronised and not, once per change."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        #: None until the first reading.
        self.synchronized: bool | None = None

    def observe(self, state: ClockState) -> None:
        change = sync_change(self.synchronized, state)
        self.synchronized = state.synchronized
        if change is not None:
            self.logger.log(*change)


def measure_precision(samples: int = 64) -> int:
    """log2 of the smallest step between clock readings (RFC 5905 precision), at least -30."""
    smallest = 1 << 62
    for _ in range(samples):
        first = time.time_ns()
        second = time.time_ns()
        while second == first:
            second = time.time_ns()
        smallest = min(smallest, second - first)
    return max(-30, math.floor(math.log2(smallest / 1e9)))


def make_source(clock: ClockConfig, precision: int) -> TimeSource:
    """Build the time source a :class:`~guardntp.config.ClockConfig` asks for."""
    from .local import LocalClock
    from .system import SystemClock
    from .upstream import UpstreamClock

    if clock.source == "local":
        return LocalClock(clock.stratum, precision)
    if clock.source == "system":
        return SystemClock(clock.stratum, refid_bytes(clock.refid), precision,
                           chronyc_socket=clock.chronyc_socket)
    return UpstreamClock.from_config(clock, precision)
