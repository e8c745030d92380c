"""Changing the system clock (``query --set-clock`` only; never by default).

Edge code: needs CAP_SYS_TIME. Offsets above 0.5 s are stepped (as ntpdate -b
does); smaller ones are slewed with adjtime(3) so time never runs backwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

STEP_THRESHOLD_NS = 500_000_000


class ClockChangeError(Exception):
    pass


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


def may_set_clock() -> bool:
    return os.geteuid() == 0


def apply_offset(offset_ns: int) -> str:
    """Step or slew by ``offset_ns``; returns what was done. Raises :class:`ClockChangeError`."""
    if not may_set_clock():
        raise ClockChangeError("setting the clock needs root (CAP_SYS_TIME); nothing changed")
    if abs(offset_ns) > STEP_THRESHOLD_NS:
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME,
                                  time.clock_gettime_ns(time.CLOCK_REALTIME) + offset_ns)
        except OSError as error:
            raise ClockChangeError(f"clock_settime: {error.strerror}") from None
        return "stepped"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    seconds, micros = divmod(offset_ns // 1000, 1_000_000)
    delta = _Timeval(seconds, micros)
    if libc.adjtime(ctypes.byref(delta), None) != 0:
        raise ClockChangeError(f"adjtime: {os.strerror(ctypes.get_errno())}")
    return "slewed"
