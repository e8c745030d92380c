"""Parse + filter + respond for one packet: ``Pipeline.decide`` on each path.

Each benchmark asserts the decision it measures, so a policy change that sends
the packet down another path fails here instead of timing the wrong thing.
"""

from __future__ import annotations

import time

import pytest
from benchutil import MILLION, REQUEST, WALL_NS, Clock, make_pipeline, source_address

from guardntp.filter.pipeline import Pipeline
from guardntp.verdicts import Reason

CONTROL_QUERY = bytes([0x16]) + bytes(47)   # mode 6, NTPv2: the sanity stage drops it


def answer_loop(pipeline: Pipeline, addresses: list[bytes]):
    """decide() for the next source in turn; each returns after ~5 s (1M at 200k/s)."""
    clock = Clock()
    decide = pipeline.decide
    state = {"next": 0}

    def one() -> Reason:
        index = state["next"]
        state["next"] = (index + 1) % len(addresses)
        return decide(REQUEST, addresses[index], 40000, WALL_NS, clock.tick())[0]

    return one


def test_time_reply_a_million_tracked_sources(benchmark, million_pipeline, million_addresses):
    one = answer_loop(million_pipeline, million_addresses)
    assert benchmark(one) is Reason.ANSWERED


def test_time_reply_a_thousand_sources(benchmark):
    addresses = [source_address(index) for index in range(1000)]
    pipeline = make_pipeline(source_rate=1e6, source_burst=10**6)
    one = answer_loop(pipeline, addresses)
    assert benchmark(one) is Reason.ANSWERED


def test_kod(benchmark):
    # One source, far over its limit; the KoD guard and budget let every KoD out.
    pipeline = make_pipeline(source_burst=1, source_rate=0.001, leak_one_in=0,
                             kod_interval_s=0.0, kod_rate=1e9, kod_burst=10**9)
    clock = Clock()
    source = source_address(1)
    pipeline.decide(REQUEST, source, 40000, WALL_NS, clock.tick())
    decide = pipeline.decide
    reason, reply, _ = benchmark(lambda: decide(REQUEST, source, 40000, WALL_NS, clock.tick()))
    assert reason is Reason.RATE_KOD and reply is not None and reply[12:16] == b"RATE"


def test_drop_rate_limited(benchmark):
    pipeline = make_pipeline(source_burst=1, source_rate=0.001, leak_one_in=0, send_kod=False)
    clock = Clock()
    source = source_address(2)
    pipeline.decide(REQUEST, source, 40000, WALL_NS, clock.tick())
    decide = pipeline.decide
    reason, reply, _ = benchmark(lambda: decide(REQUEST, source, 40000, WALL_NS, clock.tick()))
    assert reason is Reason.RATE_LIMITED and reply is None


def test_drop_at_the_sanity_stage(benchmark):
    pipeline = make_pipeline()
    decide = pipeline.decide
    source = source_address(3)
    reason, reply, _ = benchmark(lambda: decide(CONTROL_QUERY, source, 40000, WALL_NS, 1))
    assert reason is Reason.CONTROL_MODE and reply is None


def test_new_source_each_packet(benchmark):
    """A spoofed flood from never-seen sources: the table's admission path."""
    pipeline = make_pipeline()
    clock = Clock()
    decide = pipeline.decide
    state = {"next": 0}

    def one() -> Reason:
        state["next"] += 1
        return decide(REQUEST, source_address(state["next"] % (MILLION * 4) + MILLION), 40000,
                      WALL_NS, clock.tick())[0]

    assert benchmark(one) in (Reason.ANSWERED, Reason.LEAKED, Reason.RATE_LIMITED)


def _per_packet_ns(function, count: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(count):
            function()
        best = min(best, (time.perf_counter_ns() - started) / count)
    return best


def test_the_drop_path_costs_less_than_the_answer_path(request):
    """Issue 6: dropping an over-limit request must be cheaper than answering one."""
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("a timing comparison: runs only with benchmarks enabled")
    addresses = [source_address(index) for index in range(1000)]
    answer = answer_loop(make_pipeline(source_rate=1e6, source_burst=10**6), addresses)
    limited = make_pipeline(source_burst=1, source_rate=0.001, leak_one_in=0, send_kod=False)
    clock = Clock()
    source = source_address(2)
    limited.decide(REQUEST, source, 40000, WALL_NS, clock.tick())

    def drop() -> Reason:
        return limited.decide(REQUEST, source, 40000, WALL_NS, clock.tick())[0]

    assert answer() is Reason.ANSWERED and drop() is Reason.RATE_LIMITED
    answer_ns = _per_packet_ns(answer, 20_000)
    drop_ns = _per_packet_ns(drop, 20_000)
    print(f"\nanswer {answer_ns:.0f} ns, rate-limited drop {drop_ns:.0f} ns per packet")
    assert drop_ns < answer_ns
