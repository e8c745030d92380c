"""Helpers shared by the benchmarks in this directory (imported as ``benchutil``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guardntp.clock import ClockState  # noqa: E402
from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.policy import FilterPolicy  # noqa: E402
from guardntp.responder import Responder  # noqa: E402
from guardntp.timestamps import NS_PER_S  # noqa: E402

MILLION = 1_000_000
WALL_NS = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=WALL_NS)
#: An NTPv4 client request as chrony sends it (poll 6, transmit timestamp set).
REQUEST = bytes([0x23, 0, 6, 0xEC]) + bytes(36) + (0x1122_3344_5566_7788).to_bytes(8, "big")


def source_address(index: int) -> bytes:
    """The generator's layout (bench/ntpflood.c): 16 sources per /24 across 127/8."""
    return bytes((127, (index & 0xFFFF) >> 8, index & 0xFF, 16 + (index >> 16)))


def make_pipeline(**policy: object) -> Pipeline:
    policy.setdefault("random_seed", 1)
    return Pipeline(FilterPolicy(**policy), Responder(CLOCK, WALL_NS))  # type: ignore[arg-type]


class Clock:
    """Monotonic nanoseconds that advance a fixed step per packet (5 us = 200k/s)."""

    def __init__(self, step_ns: int = 5_000) -> None:
        self.now_ns = time.monotonic_ns()
        self.step_ns = step_ns

    def tick(self) -> int:
        self.now_ns += self.step_ns
        return self.now_ns
