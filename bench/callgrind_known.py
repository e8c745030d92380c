#!/usr/bin/env python3
"""Known-source answers through the compiled decision, for instruction counts.

A pipeline whose sources never run out of budget (``source_rate=1e6``), 10,000
IPv4 sources established, then N more answers through ``FastLane.decide_one``
(default 50,000). Not timed: run it under callgrind and read the counts, which
do not move with the machine's noise (docs/benchmarks.md)::

    valgrind --tool=callgrind --toggle-collect=fast_decide \\
        python3 bench/callgrind_known.py 50000
    valgrind --tool=callgrind --toggle-collect=Lane_decide_one \\
        python3 bench/callgrind_known.py 50000

Divide "Collected" by the calls (10,000 + N).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guardntp import fastlane  # noqa: E402
from guardntp.filter.pipeline import Pipeline  # noqa: E402
from guardntp.filter.policy import FilterPolicy  # noqa: E402
from guardntp.responder import Responder  # noqa: E402
from guardntp.timesources.local import LocalClock  # noqa: E402

NOW = 1_700_000_000 * 10**9
REQUEST = bytes([0x23]) + bytes(47)   # NTPv4 client
SOURCES = 10_000


def main(answers: int) -> int:
    policy = replace(FilterPolicy(), source_rate=1e6, source_burst=10**6)
    pipeline = Pipeline(policy, Responder(LocalClock().state(NOW), NOW))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        lane = fastlane.FastLane(sock, pipeline)
        addresses = [(0x0A000000 + i).to_bytes(4, "big") for i in range(SOURCES)]
        now = NOW
        for address in addresses:   # first sightings: the table takes each one
            now += 1000
            lane.decide_one(REQUEST, address, 40000, now, now)
        for i in range(answers):
            now += 1000
            lane.decide_one(REQUEST, addresses[i % SOURCES], 40000, now, now)
    print(f"{pipeline.counters.total()} decisions")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
