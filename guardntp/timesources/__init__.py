"""Where the served time comes from (the ``--clock`` choice).

Rule: a time source is edge code. It may read clocks, call the kernel, run
``chronyc`` or talk to upstream servers, and it hands the pure code one
immutable :class:`~guardntp.clock.ClockState` per call of :meth:`TimeSource.state`.
"""

from __future__ import annotations

import ipaddress
import math
import time
from typing import Protocol

from ..clock import ClockState
from ..config import ClockConfig


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
    from .upstream import UpstreamClock, parse_upstream

    if clock.source == "local":
        return LocalClock(clock.stratum, precision)
    if clock.source == "system":
        return SystemClock(clock.stratum, refid_bytes(clock.refid), precision,
                           chronyc_socket=clock.chronyc_socket)
    return UpstreamClock([parse_upstream(text) for text in clock.upstreams], clock.poll,
                         clock.samples, clock.lost_after, clock.allow_step, precision)


def refid_bytes(text: str) -> bytes:
    """An IPv4 address, or up to four ASCII characters (a stratum-1 reference id)."""
    if not text:
        return b"\0\0\0\0"
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        if len(text) > 4 or not text.isascii():
            raise ValueError(f"refid {text!r}: an IPv4 address or up to 4 ASCII letters") \
                from None
        return text.encode().ljust(4, b"\0")
