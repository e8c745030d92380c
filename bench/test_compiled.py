"""The compiled decision (``guardntp/fastlane.py``) per packet, through ``decide_one``.

The flood benchmarks at the end send never-seen sources only (a spoofed flood, at
default settings, no warm-up): first sightings, decided in C as well.

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
from guardntp.filter.reference import new_record
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


#: A flood round: this many never-seen sources, one request each (time per round / 10,000
#: = time per packet, the loop calling decide_one included).
FLOOD_ROUND = 10_000


def flood(benchmark, lane: fastlane.FastLane, first_index: int, rounds: int,
          request: bytes = REQUEST, expected: Reason = Reason.ANSWERED) -> int:
    """``rounds`` rounds of FLOOD_ROUND sources never seen before, in the generator's
    layout (16 per /24 across 127/8), from ``first_index`` on, each sending ``request``
    once; no warm-up. Returns how many were sent (one round only under
    ``--benchmark-disable``)."""
    clock = Clock()
    state = {"next": first_index}

    def addresses() -> tuple[tuple[list[bytes]], dict[str, object]]:
        start = state["next"]
        state["next"] = start + FLOOD_ROUND
        return ([source_address(index) for index in range(start, start + FLOOD_ROUND)],), {}

    def one_round(batch: list[bytes]) -> tuple[int, bytes | None, object, bool]:
        decide, tick = lane.decide_one, clock.tick
        result = (0, None, None, False)
        for packed in batch:
            result = decide(request, packed, 40000, WALL_NS, tick())
        return result

    before = lane.first_sightings
    result = benchmark.pedantic(one_round, setup=addresses, rounds=rounds)
    assert result[0] == expected and result[3] is True
    sent = state["next"] - first_index
    assert lane.first_sightings - before == sent   # every one of them decided in C
    return sent


def test_compiled_flood_of_new_sources_while_the_table_has_room(benchmark, lane_for):
    """Default settings, an empty table: each first request creates its record and
    inserts it into the source table (dict and index) and, for the first 16 sources
    of a /24, its prefix record; 200,000 sources, within the 262,144 of the table."""
    pipeline = make_pipeline()
    sent = flood(benchmark, lane_for(pipeline), 0, 20)
    assert len(pipeline.sources) == sent


def test_compiled_flood_of_new_sources_once_the_table_is_full(benchmark, lane_for):
    """Default settings, the 262,144-source table already full: each first request
    is remembered in the newcomer ring (524,288 entries), which the 600,000
    sources here wrap."""
    pipeline = make_pipeline()
    start = Clock().now_ns
    insert = pipeline.sources.insert
    full = pipeline.sources.max_entries
    for index in range(full):
        insert(source_address(index), new_record(start, "ntpv4", 40000))
    sent = flood(benchmark, lane_for(pipeline), full, 60)
    assert len(pipeline.sources) == full
    assert len(pipeline.newcomers) == min(sent, pipeline.newcomers.max_entries)


#: A request with a MAC (key 1, a 20-byte digest) that no key verifies.
MAC_REQUEST = REQUEST + (1).to_bytes(4, "big") + bytes(20)


def test_compiled_flood_of_new_sources_with_macs(benchmark, lane_for):
    """Default settings (no keys): 68-byte requests with MACs from never-seen sources,
    each refused as AUTH_FAILED in C after the access list, as Pipeline.decide
    refuses it; 200,000 sources, within the table."""
    pipeline = make_pipeline()
    sent = flood(benchmark, lane_for(pipeline), 0, 20, MAC_REQUEST, Reason.AUTH_FAILED)
    assert len(pipeline.sources) == sent
