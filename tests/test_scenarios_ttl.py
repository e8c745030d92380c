"""Arrival TTLs in the flood corpus, and the scenarios that need them.

Every event carries the IP TTL (IPv4) / hop limit (IPv6) its packet arrives with; the
capture writes it into the frame (IPv4 header checksum kept valid), ``parse_udp``
reads it back and the in-process replay hands it to ``Pipeline.decide(ttl=...)``.
The scenarios below (a big NAT, fast pollers, a flood forged in its victims' names
at another TTL, RIPE-Atlas-style triplets, a DENY loop) are checked for the shapes
their SCALE_ONE entries promise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from guardntp import fastlane
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.replay.capture import build_templates, make_capture
from guardntp.replay.inprocess import replay_in_process
from guardntp.replay.pcap import parse_udp, read_frames, word_sum
from guardntp.replay.scenarios import (
    ABUSIVE,
    KIND_PAYLOADS,
    LEGITIMATE,
    MIXES,
    SCALE_ONE,
    SCENARIOS,
    SPOOFER_TTL,
    VICTIM_TTL,
    VICTIMS_NETWORK,
    Event,
    Kind,
    mix_events,
    resolve_names,
)
from guardntp.replay.sidecar import read_labels, sidecar_paths
from guardntp.timestamps import NS_PER_S

NEW = {"cgnat-800": LEGITIMATE, "fast-poller": ABUSIVE, "fast-poller-random-ports": ABUSIVE,
       "spoofed-victim": LEGITIMATE, "victim-spoofer": ABUSIVE, "ripe-atlas": LEGITIMATE,
       "deny-loop": ABUSIVE}


def _events(name: str, seed: int = 1, scale: float = 1, duration_s: float = 600
            ) -> list[Event]:
    return list(mix_events([name], seed, scale, int(duration_s * NS_PER_S)))


def _by_client(events: list[Event]) -> dict[int, list[Event]]:
    clients: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        clients[event[2]].append(event)
    return clients


def _gaps_s(events: list[Event]) -> list[float]:
    return [(b[0] - a[0]) / NS_PER_S for a, b in zip(events, events[1:], strict=False)]


# ---------------------------------------------------------------------- frames

@pytest.mark.parametrize("width", [4, 16])
def test_templates_patch_the_ttl_and_keep_the_ipv4_header_checksum(width: int) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    rng = random.Random(width)
    template = build_templates()[(Kind.NTPV4, width)]
    for ttl in (0, 1, 2, 44, 57, 63, 64, 65, 127, 128, 200, 254, 255, *rng.sample(range(256), 20)):
        src = rng.randbytes(width)
        port = rng.randrange(65536)
        frame = template.build(src, word_sum(src), port, rng.getrandbits(64), ttl)
        packet = Ether(frame)
        network = packet[IP] if width == 4 else packet[IPv6]
        assert (network.ttl if width == 4 else network.hlim) == ttl
        assert ipaddress.ip_address(network.src).packed == src
        rebuilt = packet.copy()
        if width == 4:
            del rebuilt[IP].chksum
        del rebuilt[UDP].chksum
        assert bytes(Ether(bytes(rebuilt))) == frame, f"bad checksum at TTL {ttl}"
        datagram = parse_udp(frame)
        assert datagram is not None
        assert datagram[0] == src and datagram[1] == port and datagram[5] == ttl


def test_parse_udp_reads_foreign_ttls_and_hop_limits() -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.packet import Raw

    request = Raw(bytes([0x23]) + bytes(47))
    # Explicit MACs: scapy would otherwise look the destination's up (ARP, neighbours).
    mac = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
    v4 = Ether(**mac) / IP(src="192.0.2.1", dst="192.0.2.9", ttl=33) / \
        UDP(sport=4, dport=123) / request
    v6 = Ether(**mac) / IPv6(src="2001:db8::1", dst="2001:db8::9", hlim=7) / \
        UDP(dport=123) / request
    vlan = Ether(**mac) / Dot1Q(vlan=5) / IP(src="192.0.2.1", dst="192.0.2.9", ttl=250) / \
        UDP(dport=123) / request
    ttls = [parse_udp(bytes(frame)) for frame in (v4, v6, vlan)]
    assert [d[5] if d else None for d in ttls] == [33, 7, 250]
    assert [len(d[4]) if d else None for d in ttls] == [48, 48, 48]


def test_ttls_survive_capture_and_parse_with_valid_checksums(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    names = resolve_names(["ipv6-hosts", "w32time", "spoofed-victim", "victim-spoofer",
                           "fast-poller", "cgnat-800", "top-of-hour"])
    duration_s = 80   # the spoofer starts at 72 s
    out = tmp_path / "ttl.pcap"
    make_capture(names, out, 4, 0.05, duration_s)
    events = list(mix_events(names, 4, 0.05, duration_s * NS_PER_S))
    frames = [frame for _, frame in read_frames(str(out))]
    assert len(frames) == len(events) > 300
    packets = rdpcap(str(out))
    families = set()
    flood = names.index("victim-spoofer")
    for index, (event, frame, packet) in enumerate(zip(events, frames, packets, strict=True)):
        datagram = parse_udp(frame)
        assert datagram is not None
        assert (datagram[0], datagram[1], datagram[5]) == (event[4], event[5], event[6])
        if event[1] == flood and index % 20:
            continue  # scapy is slow: every packet of the others, 1 in 20 of the flood's
        network = packet[IP] if IP in packet else packet[IPv6]
        families.add(network.version)
        assert (network.ttl if IP in packet else network.hlim) == event[6]
        rebuilt = packet.copy()
        if IP in rebuilt:
            del rebuilt[IP].chksum
        del rebuilt[UDP].chksum
        assert bytes(Ether(bytes(rebuilt))) == frame
        if event[3] == Kind.NTPV4_FAST:
            assert datagram[4][2] == 0xFE  # poll -2
    assert families == {4, 6}
    # Windows starts at 128, lwIP (the IoT devices) at 255, the rest at 64.
    ttls = defaultdict(set)
    for event in events:
        ttls[names[event[1]]].add(event[6])
    assert all(108 <= t <= 125 for t in ttls["w32time"])
    assert max(ttls["top-of-hour"]) > 200 and min(ttls["top-of-hour"]) < 64
    assert all(41 <= t <= 61 for t in ttls["ipv6-hosts"] | ttls["cgnat-800"])
    assert ttls["spoofed-victim"] == {VICTIM_TTL} and ttls["victim-spoofer"] == {SPOOFER_TTL}


def test_the_in_process_replay_hands_the_ttl_to_decide(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "pair.pcap"
    names = ["spoofed-victim", "victim-spoofer", "ipv6-hosts"]
    make_capture(names, out, 2, 0.5, 90)
    seen: list[tuple[bytes, int]] = []
    # What the replay calls: the compiled decision where it is built (which hands
    # what it does not take to Pipeline.decide), else Pipeline.decide.
    owner: type = fastlane.FastLane if fastlane.available() else Pipeline
    name = "decide_one" if owner is fastlane.FastLane else "decide"
    decide = getattr(owner, name)

    def recording(self: object, data: bytes, packed: bytes, port: int, recv_ns: int,
                  now_ns: int, ttl: int = -1) -> object:
        seen.append((packed, ttl))
        return decide(self, data, packed, port, recv_ns, now_ns, ttl)

    monkeypatch.setattr(owner, name, recording)
    run = replay_in_process(out, replace(FilterPolicy(), random_seed=7),
                            read_labels(sidecar_paths(out)[0]))
    expected = [(e[4], e[6]) for e in mix_events(names, 2, 0.5, 90 * NS_PER_S)]
    assert seen == expected and len(seen) == sum(g.requests for g in run.groups) > 1000
    assert {ttl for _, ttl in seen} >= {VICTIM_TTL, SPOOFER_TTL}


# ---------------------------------------------------------------------- every scenario

def test_the_new_scenarios_are_registered_documented_and_mixed() -> None:
    for name, klass in NEW.items():
        assert SCENARIOS[name].klass == klass
        assert SCALE_ONE[name]
        assert name in MIXES["all"]
        assert name in MIXES["floods" if klass == ABUSIVE else "normal"]
    assert set(SCALE_ONE) == set(SCENARIOS)


def test_every_source_keeps_one_ttl_except_behind_a_nat() -> None:
    events = list(mix_events(list(SCENARIOS), 5, 0.05, 300 * NS_PER_S))
    names = list(SCENARIOS)
    ttls: dict[tuple[str, bytes], set[int]] = defaultdict(set)
    for event in events:
        ttls[(names[event[1]], event[4])].add(event[6])
        assert 1 <= event[6] <= 255
    for (name, src), values in ttls.items():
        if name in ("cgnat", "cgnat-800"):
            assert len(values) <= 2, (name, src, values)  # one or two hops behind the NAT
        else:
            assert len(values) == 1, (name, src, values)
    assert len({next(iter(v)) for (n, _), v in ttls.items() if n == "chrony"}) > 5


def test_scenarios_and_their_ttls_are_deterministic() -> None:
    for name in NEW:
        first = _events(name, seed=3, scale=0.5, duration_s=120)
        assert first == _events(name, seed=3, scale=0.5, duration_s=120), name
        assert first != _events(name, seed=4, scale=0.5, duration_s=120), name
    # The TTLs come from no generator: every other field of the older scenarios is what
    # it was before TTLs existed (digests recorded then: seed 1, scale 0.1, 300 s).
    for name, (count, digest) in OLD_DIGESTS.items():
        events = _events(name, seed=1, scale=0.1, duration_s=300)
        fields = repr([(e[0], e[2], int(e[3]), e[4], e[5]) for e in events])
        assert (len(events), hashlib.sha256(fields.encode()).hexdigest()[:16]) == \
            (count, digest), name


#: (events, sha256 of their (t, client, kind, src, port)) per scenario before TTLs.
OLD_DIGESTS = {
    "netgear-2003": (15000, "c8837ebabc7a0f05"), "dlink-2005": (1042, "340692105a2cf5da"),
    "smc-2003": (999, "d15511aa9f321b40"), "mobatime-2009": (4447, "b6c3f31ae5c3e000"),
    "spoofed-random": (15152, "b5cba32a99c60105"),
    "reflection-probes": (1471, "f4fd5b6c81fb1c7d"), "top-of-hour": (483, "6f639d9ff0ea0807"),
    "chrony": (105, "214436493caf10fa"), "w32time": (3, "e771876ba0ef70b9"),
    "cgnat": (122, "4d208556e825a2f3"), "ipv6-hosts": (44, "743abdbe4c775b2b"),
}


# ---------------------------------------------------------------------- the new scenarios

def test_cgnat_800_is_one_address_of_800_pollers_with_fresh_ports() -> None:
    events = _events("cgnat-800")
    assert {SCENARIOS["cgnat-800"].networks[0]} == {"172.16.0.0/16"}
    assert len({e[4] for e in events}) == 1
    assert len({e[2] for e in events}) == 800
    assert len({e[5] for e in events}) >= 0.9 * len(events)    # a new NAT port per request
    assert 12.0 <= len(events) / 600 <= 13.5                   # 800 / 64 s = 12.5/s
    assert {e[3] for e in events} == {Kind.NTPV4} and KIND_PAYLOADS[Kind.NTPV4][2] == 6
    # Each client polls at 64 s (+- 2 %); only the few that restart send an iburst.
    gaps = [g for client in _by_client(events).values() for g in _gaps_s(client)]
    steady = [g for g in gaps if 62.7 <= g <= 65.3]
    assert len(steady) >= 0.98 * len(gaps)
    assert all(g >= 1.99 for g in gaps)
    # Arrivals are a superposition: no second is empty, none carries a burst.
    per_second = [0] * 600
    for event in events:
        per_second[event[0] // NS_PER_S] += 1
    assert min(per_second[64:]) >= 2 and max(per_second) <= 35
    assert len({e[4] for e in _events("cgnat-800", scale=3, duration_s=64)}) == 3


@pytest.mark.parametrize("name", ["fast-poller", "fast-poller-random-ports"])
def test_fast_pollers_send_every_quarter_second_with_poll_minus_2(name: str) -> None:
    events = _events(name, duration_s=60)
    clients = _by_client(events)
    assert len(clients) == 5 and len({e[4] for e in events}) == 5
    assert {e[3] for e in events} == {Kind.NTPV4_FAST}
    payload = KIND_PAYLOADS[Kind.NTPV4_FAST]
    assert payload[0] == 0x23 and payload[2] == 0xFE
    for client in clients.values():
        gaps = _gaps_s(client)
        assert all(0.2475 - 1e-9 <= g <= 0.2525 + 1e-9 for g in gaps)
        assert statistics.mean(gaps) == pytest.approx(0.25, abs=0.001)
        assert 238 <= len(client) <= 240
        ports = [e[5] for e in client]
        if name == "fast-poller":
            assert len(set(ports)) == 1 and 32768 <= ports[0] < 61000
        else:
            assert len(set(ports)) >= 0.95 * len(ports)       # a new socket per request
            assert all(32768 <= p < 61000 for p in ports)


def test_the_spoofer_forges_exactly_the_victims_addresses_at_another_ttl() -> None:
    victims = _events("spoofed-victim")
    spoofed = _events("victim-spoofer")
    addresses = {e[4] for e in victims}
    assert len(addresses) == 4 and addresses == {e[4] for e in spoofed}
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network(VICTIMS_NETWORK)
               for a in addresses)
    assert {e[6] for e in victims} == {VICTIM_TTL} == {57}
    assert {e[6] for e in spoofed} == {SPOOFER_TTL} != {VICTIM_TTL}
    # The same victims in any mix, in either order, whatever else is mixed in (but a new
    # seed, new victims).
    mixed = list(mix_events(["victim-spoofer", "chrony", "spoofed-victim"], 1, 1,
                            100 * NS_PER_S))
    assert {e[4] for e in mixed if e[1] == 0} == {e[4] for e in mixed if e[1] == 2} == addresses
    assert {e[4] for e in _events("victim-spoofer", seed=2, duration_s=100)} != addresses
    # Each victim: an iburst of 4 (2 s apart) in the first minute, then 64 s polls, one port.
    for client in _by_client(victims).values():
        assert len({e[5] for e in client}) == 1
        gaps = _gaps_s(client)
        assert gaps[:3] == pytest.approx([2.0, 2.0, 2.0])
        assert all(62.7 <= g <= 65.3 for g in gaps[3:]) and len(gaps) >= 10
        assert client[0][0] < 64 * NS_PER_S
    # The flood: 50/s per victim (Poisson), random ports, from 72 s on: once every victim
    # has polled (its iburst done), so the server knows it.
    assert min(e[0] for e in spoofed) >= 72 * NS_PER_S > max(c[3][0] for c in
                                                             _by_client(victims).values())
    for client in _by_client(spoofed).values():
        assert 50 * 528 * 0.97 <= len(client) <= 50 * 528 * 1.03
        assert len({e[5] for e in client}) > 0.6 * len(client)
        gaps = _gaps_s(client)
        assert statistics.pstdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.1)
    assert len(_events("spoofed-victim", scale=2, duration_s=64)) > 0
    assert {e[4] for e in _events("spoofed-victim", scale=2, duration_s=120)} == \
        {e[4] for e in _events("victim-spoofer", scale=2, duration_s=80)}


def test_ripe_atlas_probes_send_triplets_every_240_s() -> None:
    events = _events("ripe-atlas")
    clients = _by_client(events)
    assert len(clients) == len({e[4] for e in events}) == 1000
    for client in clients.values():
        measurements: list[list[Event]] = []
        for event in client:
            if measurements and event[0] - measurements[-1][-1][0] < NS_PER_S:
                measurements[-1].append(event)
            else:
                measurements.append([event])
        for triplet in measurements:
            if triplet[-1][0] + NS_PER_S // 10 < 600 * NS_PER_S:
                assert len(triplet) == 3
            assert len({e[5] for e in triplet}) == 1          # one port per measurement
            assert all(0.002 <= g <= 0.010 for g in _gaps_s(triplet))
        starts = [triplet[0][0] / NS_PER_S for triplet in measurements]
        assert all(237.5 <= b - a <= 242.5 for a, b in zip(starts, starts[1:], strict=False))
        assert 2 <= len(starts) <= 3
    assert 7000 <= len(events) <= 8000


def test_deny_loop_sends_as_fast_as_its_round_trip() -> None:
    events = _events("deny-loop")
    assert len({e[4] for e in events}) == 1 and len({e[5] for e in events}) == 1
    assert 100 * 600 * 0.99 <= len(events) <= 100 * 600 * 1.01
    gaps = _gaps_s(events)
    assert all(0.009 - 1e-9 <= g <= 0.011 + 1e-9 for g in gaps)
    assert len({e[4] for e in _events("deny-loop", scale=5, duration_s=1)}) == 5


def test_the_new_scenarios_stay_small_enough_for_ci() -> None:
    total = sum(len(_events(name)) for name in NEW)
    assert total < 250_000
