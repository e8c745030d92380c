"""The compiled decision (``guardntp/fastlane.py``) per packet, through ``decide_one``.

``decide_one`` is the same C decision the server's loop runs, plus one Python call
per packet (the loop itself makes none), so these are upper bounds. The answer and
the rate-limited drop are measured the same way, among a million tracked sources
visited in turn, so that both pay the same cache misses: the drop path must cost
less than the answer path (issue 6), and in the server it also saves the send.
"""

from __future__ import annotations

import socket

import pytest
from benchutil import REQUEST, WALL_NS, Clock, make_pipeline, source_address
from conftest import build_million_pipeline

from guardntp import fastlane
from guardntp.filter.pipeline import Pipeline
from guardntp.verdicts import Reason

pytestmark = pytest.mark.skipif(not fastlane.available(), reason="compiled loop not built")

CONTROL_QUERY = bytes([0x16]) + bytes(47)


@pytest.fixture
def lane_for():
    sockets: list[socket.socket] = []

    def make(pipeline: Pipeline) -> fastlane.FastLane:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(sock)
        return fastlane.FastLane(sock, pipeline)

    yield make
    for sock in sockets:
        sock.close()


def visit_in_turn(lane: fastlane.FastLane, addresses: list[bytes]):
    """One request per call, from each of ``addresses`` in turn; after one pass in
    Python (each source's access-list cache and prefix record), all in C."""
    clock = Clock()
    state = {"next": 0}

    def one() -> tuple[int, bytes | None, object, bool]:
        index = state["next"]
        state["next"] = (index + 1) % len(addresses)
        return lane.decide_one(REQUEST, addresses[index], 40000, WALL_NS, clock.tick())

    for _ in range(len(addresses)):
        one()
    return one


def test_compiled_time_reply_a_million_tracked_sources(benchmark, lane_for,
                                                       own_million_pipeline, million_addresses):
    lane = lane_for(own_million_pipeline)
    one = visit_in_turn(lane, million_addresses)
    before = lane.fast_decisions
    result = benchmark(one)
    assert result[0] == Reason.ANSWERED and result[3] is True
    assert lane.fast_decisions > before


def test_compiled_time_reply_ipv6_sources(benchmark, lane_for):
    """IPv6 clients (each its own /64, 16 per /56) on the compiled path: the access
    list has no IPv6 entry, so no lookup is needed (AccessList.covers_ipv6)."""
    addresses = [bytes((0x20, 0x01, 0x0d, 0xb8, (index >> 12) & 0xFF, (index >> 4) & 0xFF,
                        0, index & 0xF)) + bytes(7) + b"\x01" for index in range(200_000)]
    lane = lane_for(make_pipeline(max_sources=1 << 20))
    one = visit_in_turn(lane, addresses)
    result = benchmark(one)
    assert result[0] == Reason.ANSWERED and result[3] is True


def test_compiled_rate_limited_drop_a_million_tracked_sources(benchmark, lane_for,
                                                              million_addresses):
    pipeline = build_million_pipeline(million_addresses, drained=True, leak_one_in=0,
                                      send_kod=False)
    one = visit_in_turn(lane_for(pipeline), million_addresses)
    result = benchmark(one)
    assert result[:2] == (Reason.RATE_LIMITED, None) and result[3] is True


def test_compiled_drop_at_the_sanity_stage(benchmark, lane_for):
    lane = lane_for(make_pipeline())
    source = source_address(3)
    result = benchmark(lambda: lane.decide_one(CONTROL_QUERY, source, 40000, WALL_NS, 1))
    assert result[:2] == (Reason.CONTROL_MODE, None) and result[3] is True


def test_compiled_rate_kod_one_source(benchmark, lane_for):
    """A RATE KoD decided in C (the guard time set to zero so every request gets one)."""
    pipeline = make_pipeline(source_burst=1, source_rate=0.001, leak_one_in=0,
                             kod_interval_s=0.0, kod_rate=1e9, kod_burst=10**6)
    lane = lane_for(pipeline)
    clock = Clock()
    source = source_address(2)
    lane.decide_one(REQUEST, source, 40000, WALL_NS, clock.tick())
    result = benchmark(lambda: lane.decide_one(REQUEST, source, 40000, WALL_NS, clock.tick()))
    assert result[0] == Reason.RATE_KOD and result[1] is not None and result[3] is True
