"""The crowd estimate and TTL classes (guardntp/filter/crowd.py) at default settings.

Every scenario is scored against fixed, external yardsticks: chrony's default
``ratelimit`` allowance (burst 8 + one per 8 s per address) for floods, and the
share of a legitimate client's own requests answered. Time is virtual.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from guardntp.blocklist.auto import AutoBlocker, AutoPolicy
from guardntp.filter import crowd
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.filter.reference import CROWD, HOME_TTL
from guardntp.responder import Responder
from guardntp.timesources.local import LocalClock
from guardntp.timestamps import NS_PER_S
from guardntp.verdicts import VERDICT_OF, Reason, Verdict

WALL_NS = 1_700_000_000 * NS_PER_S
NTPV4 = bytes((0x23, 0, 6, 0xEC)) + bytes(36) + (1).to_bytes(8, "big")
FAST_POLLER = bytes((0x23, 0, 0xFE, 0xEC)) + bytes(36) + (1).to_bytes(8, "big")
SNTPV1 = bytes((0x0B,)) + bytes(39) + (1).to_bytes(8, "big")


def pipeline(**settings: object) -> Pipeline:
    policy = FilterPolicy(random_seed=1, **settings)  # type: ignore[arg-type]
    clock = LocalClock()
    return Pipeline(policy, Responder(clock.state(WALL_NS), WALL_NS))


def chrony_allowance(requests: int, span_ns: int) -> int:
    return min(requests, 8 + span_ns // (8 * NS_PER_S))


Event = tuple[int, bytes, bytes, int, int, str]   # (now, data, address, port, ttl, who)


def run(p: Pipeline, events: list[Event]) -> dict[str, dict[str, int]]:
    """Decide every event in time order; per ``who``: requests, time replies, KoDs."""
    out: dict[str, dict[str, int]] = {}
    for now_ns, data, address, port, ttl, who in sorted(events, key=lambda e: e[0]):
        reason, reply, _ = p.decide(data, address, port, WALL_NS + now_ns, now_ns, ttl)
        tally = out.setdefault(who, {"requests": 0, "time": 0, "kod": 0})
        tally["requests"] += 1
        verdict = VERDICT_OF[reason]
        tally["time"] += verdict is Verdict.TIME
        tally["kod"] += verdict is Verdict.KOD
        if verdict is not Verdict.DROP:
            assert reply is not None and len(reply) <= len(data)
    return out


def crowd_behind_one_address(rng: random.Random, clients: int, poll_s: float,
                             duration_s: float, address: bytes, ttl: int) -> list[Event]:
    """Independent pollers at random phases, each request from its own NAT port."""
    events = []
    for _ in range(clients):
        t = rng.uniform(0, poll_s)
        while t < duration_s:
            events.append((int(t * NS_PER_S), NTPV4, address, rng.randrange(1024, 65536), ttl,
                           "crowd"))
            t += poll_s * rng.uniform(0.98, 1.02)
    return events


def periodic(rng: random.Random, period_s: float, duration_s: float, data: bytes,
             address: bytes, ttl: int, who: str, random_ports: bool,
             start_s: float | None = None) -> list[Event]:
    events = []
    port = 40_000
    t = rng.uniform(0, period_s) if start_s is None else start_s
    while t < duration_s:
        if random_ports:
            port = rng.randrange(1024, 65536)
        events.append((int(t * NS_PER_S), data, address, port, ttl, who))
        t += period_s * rng.uniform(0.99, 1.01)
    return events


def suppressed_share(tally: dict[str, int], span_s: float) -> float:
    allowed = chrony_allowance(tally["requests"], int(span_s * NS_PER_S))
    excess = tally["requests"] - allowed
    return 1 - max(0, tally["time"] - allowed) / excess


def test_crowd_table_reads_the_sketch_by_linear_counting() -> None:
    table = crowd.crowd_table(256)
    assert len(table) == 64 and table[0] == 1 and table[63] == 256
    assert list(table) == sorted(table)
    # 32 distinct ports set about 28 bits of 63 (expected 63 (1 - e^(-32/63)) = 25).
    assert 20 <= table[25] <= 40
    assert crowd.crowd_table(1) == (1,) * 64
    assert not crowd.is_irregular(250_000_000, 2_500_000)
    assert crowd.is_irregular(80_000_000, 59_000_000)


def test_800_clients_behind_one_nat_address_are_all_served_at_default_settings() -> None:
    rng = random.Random(1)
    p = pipeline()
    address = bytes((100, 64, 7, 9))
    events = crowd_behind_one_address(rng, 800, 64.0, 600.0, address, 50)
    tally = run(p, events)["crowd"]
    assert tally["requests"] > 7000
    assert tally["time"] / tally["requests"] >= 0.999, tally
    assert p.sources.records[address][CROWD] >= 100


def test_without_the_crowd_estimate_the_same_nat_address_is_cut_to_one_client() -> None:
    rng = random.Random(1)
    p = pipeline(max_crowd=1)
    tally = run(p, crowd_behind_one_address(rng, 800, 64.0, 600.0, bytes((100, 64, 7, 9)),
                                            50))["crowd"]
    assert tally["time"] / tally["requests"] < 0.05, tally


@pytest.mark.parametrize("random_ports", [False, True])
def test_a_fast_poller_gets_at_most_five_percent_of_its_excess(random_ports: bool) -> None:
    # chronyd with minpoll -2: every 0.25 s, from one port or a new one per request.
    rng = random.Random(2)
    p = pipeline()
    tally = run(p, periodic(rng, 0.25, 600.0, FAST_POLLER, bytes((10, 9, 0, 1)), 60, "poller",
                            random_ports))["poller"]
    assert suppressed_share(tally, 600.0) >= 0.95, tally


def test_a_steady_two_per_second_host_is_held_to_chronys_allowance() -> None:
    rng = random.Random(3)
    tally = run(pipeline(), periodic(rng, 0.5, 300.0, NTPV4, bytes((10, 80, 0, 1)), 60, "host",
                                     False))["host"]
    assert suppressed_share(tally, 300.0) >= 0.95, tally


def spoofed_victim_events(rng: random.Random, victim: bytes, duration_s: float
                          ) -> list[Event]:
    """A chrony client polling every 64 s (TTL 57); from 5 s on, 50/s in its name (TTL 44)."""
    events = periodic(rng, 64.0, duration_s, NTPV4, victim, 57, "victim", False, start_s=0.5)
    t = 5.0
    while True:
        t += rng.expovariate(50.0)
        if t >= duration_s:
            return events
        events.append((int(t * NS_PER_S), NTPV4, victim, rng.randrange(1024, 65536), 44,
                       "spoofer"))


def test_a_victim_spoofed_from_another_ttl_keeps_its_service() -> None:
    rng = random.Random(4)
    p = pipeline()
    victim = bytes((192, 0, 2, 10))
    out = run(p, spoofed_victim_events(rng, victim, 600.0))
    assert out["victim"]["time"] / out["victim"]["requests"] >= 0.95, out
    assert out["spoofer"]["time"] / out["spoofer"]["requests"] <= 0.05, out
    # Both classes active: no RATE KoD reaches the victim's address on the spoofer's account.
    assert out["spoofer"]["kod"] == 0, out
    assert p.sources.records[victim][HOME_TTL] == 57


def test_without_ttl_classes_the_spoofer_cuts_the_victim_off() -> None:
    # (with the crowd estimate off: a spoofer from random ports at random times looks
    # like a crowd, and would get up to its prefix's bucket, victim included)
    rng = random.Random(4)
    out = run(pipeline(ttl_classes=False, max_crowd=1),
              spoofed_victim_events(rng, bytes((192, 0, 2, 10)), 600.0))
    assert out["victim"]["time"] / out["victim"]["requests"] < 0.5, out
    assert out["spoofer"]["kod"] > 10, out


def test_sntpv1_floods_get_rate_kods_in_their_own_version_at_most_one_per_guard_time() -> None:
    rng = random.Random(5)
    p = pipeline()
    address = bytes((10, 16, 0, 1))
    events = periodic(rng, 1.0, 160.0, SNTPV1, address, 60, "netgear", False)
    events = [(t, d, a, 23457, ttl, who) for t, d, a, _, ttl, who in events]
    kods = []
    for now_ns, data, src, port, ttl, _ in sorted(events):
        reason, reply, _ = p.decide(data, src, port, WALL_NS + now_ns, now_ns, ttl)
        if reason is Reason.RATE_KOD:
            assert reply is not None and (reply[0] >> 3) & 7 == 1 and reply[12:16] == b"RATE"
            kods.append(now_ns)
    assert 5 <= len(kods) <= 11
    assert all(b - a >= 16 * NS_PER_S for a, b in zip(kods, kods[1:], strict=False))
    # The switch stays: send_kod = false per label.
    quiet = pipeline(label_policies={
        label: dataclasses.replace(policy, send_kod=False)
        for label, policy in FilterPolicy().label_policies.items()})
    assert run(quiet, events)["netgear"]["kod"] == 0


def test_automatic_blocking_leaves_an_address_with_two_ttl_classes_alone() -> None:
    rng = random.Random(6)
    p = pipeline()
    victim, flooder = bytes((192, 0, 2, 10)), bytes((192, 0, 2, 11))
    events = spoofed_victim_events(rng, victim, 200.0)
    events += periodic(rng, 0.05, 200.0, NTPV4, flooder, 50, "flooder", True)
    blocker = AutoBlocker(AutoPolicy(enabled=True, after_s=30.0))
    due: set[bytes] = set()
    last_scan = 0
    for now_ns, data, src, port, ttl, _ in sorted(events, key=lambda e: e[0]):
        p.decide(data, src, port, WALL_NS + now_ns, now_ns, ttl)
        if now_ns - last_scan >= NS_PER_S:
            last_scan = now_ns
            due |= {key for key, _ in blocker.scan(p.sources.records, now_ns)}
    assert flooder in due       # one class, flooding: blocked
    assert victim not in due    # flooded in its name from another TTL: not blocked
