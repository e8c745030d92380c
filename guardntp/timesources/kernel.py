"""Read-only access to the kernel clock discipline (adjtimex / ntp_adjtime).

Only ``modes = 0`` calls are made here: they need no privilege and change nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

# <sys/timex.h> status bits and return values.
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
STA_NANO = 0x2000
TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux, LP64): 208 bytes.
    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True, slots=True)
class KernelClock:
    """What the kernel says of its clock discipline."""

    state: int          # TIME_OK .. TIME_ERROR
    status: int         # STA_* bits
    maxerror_us: int
    esterror_us: int

    @property
    def synchronized(self) -> bool:
        return not (self.status & STA_UNSYNC) and self.state != TIME_ERROR

    @property
    def leap_insert(self) -> bool:
        return bool(self.status & STA_INS)

    @property
    def leap_delete(self) -> bool:
        return bool(self.status & STA_DEL)


_libc: ctypes.CDLL | None = None


def read_kernel_clock() -> KernelClock:
    """One ``adjtimex`` read. Raises ``OSError`` where the call is not available."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    timex = _Timex()
    state = _libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "adjtimex failed")
    return KernelClock(state, timex.status, timex.maxerror, timex.esterror)
