"""The compiled decision (``guardntp/fastlane.py``) per packet, through ``decide_one``.

``decide_one`` is the same C decision the server's loop runs, plus one Python call
per packet (the loop itself makes none), so these are upper bounds. An over-limit
request is decided by ``Pipeline.decide`` in Python after the compiled lookup:
that is the cost the rate-limited benchmark shows.
"""

from __future__ import annotations

import socket

import pytest
from benchutil import REQUEST, WALL_NS, Clock, make_pipeline, source_address

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


def test_compiled_time_reply_a_million_tracked_sources(benchmark, lane_for,
                                                       own_million_pipeline, million_addresses):
    lane = lane_for(own_million_pipeline)
    clock = Clock()
    state = {"next": 0}
    addresses = million_addresses

    def one() -> int:
        index = state["next"]
        state["next"] = (index + 1) % len(addresses)
        return lane.decide_one(REQUEST, addresses[index], 40000, WALL_NS, clock.tick())[0]

    for _ in range(len(addresses)):   # one pass in Python: access-list cache, prefixes
        one()
    before = lane.fast_decisions
    assert benchmark(one) == Reason.ANSWERED
    assert lane.fast_decisions > before


def test_compiled_drop_at_the_sanity_stage(benchmark, lane_for):
    lane = lane_for(make_pipeline())
    source = source_address(3)
    result = benchmark(lambda: lane.decide_one(CONTROL_QUERY, source, 40000, WALL_NS, 1))
    assert result[:2] == (Reason.CONTROL_MODE, None) and result[3] is True


def test_rate_limited_drop_behind_the_compiled_lookup(benchmark, lane_for):
    pipeline = make_pipeline(source_burst=1, source_rate=0.001, leak_one_in=0, send_kod=False)
    lane = lane_for(pipeline)
    clock = Clock()
    source = source_address(2)
    lane.decide_one(REQUEST, source, 40000, WALL_NS, clock.tick())
    result = benchmark(lambda: lane.decide_one(REQUEST, source, 40000, WALL_NS, clock.tick()))
    assert result[:2] == (Reason.RATE_LIMITED, None) and result[3] is False
