"""The compiled loop (``guardntp/fastlane.py``) against ``Pipeline.decide``.

The compiled code may decide a packet itself only where ``Pipeline.decide`` would
decide it the same way. The differential tests below run two identical pipelines
side by side, one through ``Pipeline.decide`` and one through the compiled
decision, over random traffic that reaches every stage (bad first bytes,
reflection ports, newcomers in full tables, over-limit sources with leaks and
KoDs, access-list and blocklist hits, MACs, IPv6, the global cap, reloads), and
compare every reply and, after every packet, every counter and every record.
The flood tests send mostly never-seen sources through small tables, so that
first sightings fill the source table, then the newcomer ring (which wraps),
and returning newcomers are promoted (evicting refilled entries) or refused;
the reference pipeline keeps its newcomers in the pure-Python ring.
The socket tests check the compiled loop end to end on loopback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import signal
import socket
import threading
import time
import types
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest

from guardntp import fastlane
from guardntp import server as server_module
from guardntp.auth import mac
from guardntp.auth.keys import parse_key_line
from guardntp.auth.server import KeyAuthenticator
from guardntp.clock import ClockState
from guardntp.filter import fingerprint
from guardntp.filter.acl import AclEntry, Action
from guardntp.filter.buckets import AddressTable, NewcomerRing, PyNewcomerRing
from guardntp.filter.lane import LanePolicy
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.filter.reference import EARLIEST_NS, GLOBAL_TAT, KOD_TAT, LATEST_NS
from guardntp.netaddr import ListenSpec
from guardntp.responder import Responder, inspect_request
from guardntp.server import Server, open_socket
from guardntp.timesources.local import LocalClock
from guardntp.timestamps import NS_PER_S, ntp_to_unix_ns
from guardntp.verdicts import LabelCounts, Reason

pytestmark = pytest.mark.skipif(
    not fastlane.available(), reason=f"compiled loop unavailable: {fastlane.unavailable_because()}")

WALL_BASE_NS = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=1_000_000, root_dispersion_ns=2_000_000,
                   reference_unix_ns=WALL_BASE_NS - NS_PER_S, offset_ns=-1_234_567)

V4_SOURCES = [bytes((192, 0, 2, i)) for i in (1, 2, 3, 4, 77)] + \
             [bytes((198, 51, 100, i)) for i in (1, 2, 9)] + \
             [bytes((203, 0, 113, i)) for i in (5, 6, 200)] + [bytes((10, 1, 2, 3))]
V6_SOURCES = [ipaddress.IPv6Address(a).packed for a in
              ("2001:db8::1", "2001:db8:0:1::5", "2001:db8:0:1::6", "2001:db8:0:1f::1")]
#: First bytes: v1-v4 clients, v1 mode 0, symmetric, responses, modes 6/7, LI=3, bad versions.
FIRST_BYTES = [0x23, 0x23, 0x23, 0x1B, 0x1B, 0x13, 0x0B, 0x08, 0x09, 0x21, 0x24, 0x26, 0x27,
               0x20, 0x3B, 0xE3, 0x03, 0x19]
PORTS = [40_000, 40_001, 51_234, 123, 23_457, 53, 0, 19, 11_211]
KEY = parse_key_line("7 SHA256 HEX:" + "ab" * 32)


def packet(rng: random.Random) -> bytes:
    first = rng.choice(FIRST_BYTES) if rng.random() < 0.95 else rng.randrange(256)
    body = bytes((first, rng.choice((0, 6, 10, 17)), rng.choice((0, 6, 250)))) + \
        rng.randbytes(37) + rng.randbytes(8)
    kind = rng.random()
    if kind < 0.9:
        return body
    if kind < 0.93:
        return body[: rng.choice((0, 1, 44, 47))]
    if kind < 0.95:
        return body + bytes(4) + rng.randbytes(32)   # a MAC with an unknown key
    if kind < 0.96:
        return body + (7).to_bytes(4, "big") + rng.randbytes(32)   # key 7, wrong digest
    if kind < 0.98:
        return mac.sign(KEY, body, digest_len=rng.choice((20, 32)))   # key 7, valid
    if kind < 0.975:
        return body + rng.randbytes(rng.choice((3, 8, 20)))
    if kind < 0.985:
        return body + tail(rng)
    return body + nts_fields(rng)


def extension_field(rng: random.Random, length: int) -> bytes:
    """An RFC 7822 field of ``length`` bytes (type, length, value), of a type nobody reads."""
    return rng.choice((0x0101, 0x2005, 0xFFFF)).to_bytes(2, "big") + \
        length.to_bytes(2, "big") + rng.randbytes(length - 4)


def nts_fields(rng: random.Random) -> bytes:
    """NTS-looking fields: a Unique Identifier first (which ChecksumNts claims), another
    field, and now and then a MAC after them."""
    return b"\x01\x04\x00\x24" + rng.randbytes(32) + extension_field(rng, 16) + (
        (7).to_bytes(4, "big") + rng.randbytes(20) if rng.random() < 0.2 else b"")


def tail(rng: random.Random) -> bytes:
    """What may follow a header: extension fields (one of them perhaps readable as a
    long MAC), fields and then a MAC, a crypto-NAK, a MAC of any length, a field whose
    length runs past the end, or junk."""
    kind = rng.randrange(8)
    if kind == 7:
        return nts_fields(rng)
    if kind == 0:
        return b"".join(extension_field(rng, rng.choice((16, 20, 28, 64)))
                        for _ in range(rng.randint(1, 3)))
    if kind == 1:
        return extension_field(rng, 16) + (7).to_bytes(4, "big") + rng.randbytes(
            rng.choice((16, 20)))
    if kind == 2:
        return bytes(4)
    if kind == 3:
        return (7).to_bytes(4, "big") + rng.randbytes(rng.choice((0, 16, 20, 28, 32, 64)))
    if kind == 4:
        return extension_field(rng, 28)   # 28 bytes: fields, or one long MAC
    if kind == 5:
        field = bytearray(extension_field(rng, 16))
        field[2:4] = (rng.choice((12, 18, 20, 200))).to_bytes(2, "big")
        return bytes(field)
    return rng.randbytes(4 * rng.randint(1, 30))


TIGHT = dict(source_rate=2.0, source_burst=3, prefix_rate=6.0, prefix_burst=8,
             max_sources=6, max_prefixes=3, max_newcomers=4, global_reply_rate=25.0,
             global_reply_burst=5, kod_interval_s=1.0, kod_rate=3.0, kod_burst=2,
             leak_one_in=4)
#: The TTLs requests arrive with: unknown, two near each other (one class), others.
TTLS = (-1, 57, 58, 44, 64, 255)
DENY_ENTRIES = (AclEntry(ipaddress.ip_network("198.51.100.0/24"), Action.DENY),
                AclEntry(ipaddress.ip_network("192.0.2.77/32"), Action.EXEMPT),
                AclEntry(ipaddress.ip_network("192.0.2.4/32"), Action.DROP))

VARIANTS = {
    "defaults": {},
    "tight": TIGHT,
    "tight-acl": dict(TIGHT, acl=DENY_ENTRIES, deny_action=Action.DENY),
    "prefix-20": dict(TIGHT, ipv4_prefix=20),
    # IPv6 keys of every shape: a prefix that is not whole bytes, and /128 for both.
    "ipv6-prefix-60": dict(TIGHT, ipv6_prefix=60),
    "ipv6-128": dict(TIGHT, ipv6_source_prefix=128, ipv6_prefix=128),
    "no-global-cap": dict(TIGHT, global_reply_rate=0.0),
    "no-symmetric-no-kod": dict(TIGHT, answer_symmetric=False, send_kod=False,
                                leak_one_in=0),
    "no-crowd-no-ttl-classes": dict(TIGHT, max_crowd=1, ttl_classes=False),
    "auth-optional": dict(TIGHT, _auth="optional"),
    "auth-required": dict(TIGHT, _auth="required"),
    "auth-nts": dict(TIGHT, _auth="optional", _nts=True),
}


def authenticator(mode: str | None) -> KeyAuthenticator | None:
    if mode is None:
        return None
    assert KEY is not None
    require = [ipaddress.ip_network("203.0.113.0/24")] if mode == "required" else []
    return KeyAuthenticator({KEY.key_id: KEY}, require=require)


def decide_both(reference: Pipeline, compiled: Pipeline, lane: fastlane.FastLane, step: int,
                data: bytes, source: bytes, port: int, recv_ns: int, now_ns: int,
                ttl: int) -> tuple[int, bool, str, bool]:
    """One datagram through the reference model and the compiled lane: the same reason,
    reply and signed reply, and afterwards the same state. Returns (reason, decided in
    C, where: the step described for assertion messages, signed)."""
    expected = reference.decide(data, source, port, recv_ns, now_ns, ttl)
    reason, reply, signer, in_c = lane.decide_one(data, source, port, recv_ns, now_ns, ttl)
    where = f"step {step}: {data[:1].hex()} len {len(data)} from {source.hex()}:{port}"
    assert (reason, reply) == (expected[0], expected[1]), where
    assert (signer is None) == (expected[2] is None), where
    if signer is not None:   # the same key and digest length: the same signed reply
        assert signer(reply) == expected[2](expected[1]), where
    assert compiled.snapshot() == reference.snapshot(), where
    return reason, in_c, where, signer is not None


def pair(settings: dict[str, object], seed: int) -> tuple[Pipeline, Pipeline, fastlane.FastLane,
                                                          socket.socket]:
    settings = dict(settings)
    auth = settings.pop("_auth", None)
    nts = settings.pop("_nts", False)
    policy = FilterPolicy(random_seed=seed, **settings)  # type: ignore[arg-type]
    reference = Pipeline(policy, Responder(CLOCK, WALL_BASE_NS), authenticator(auth))
    # The reference model keeps its newcomers in Python (the compiled side's ring is C).
    reference.newcomers.ring = PyNewcomerRing(policy.max_newcomers)
    # ... and its tables in OrderedDicts, the model of the compiled AddressTable.
    reference.sources.records = OrderedDict()
    reference.prefixes.records = OrderedDict()
    compiled = Pipeline(policy, Responder(CLOCK, WALL_BASE_NS), authenticator(auth))
    if nts:
        reference.nts = ChecksumNts()
        compiled.nts = ChecksumNts()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return reference, compiled, fastlane.FastLane(sock, compiled), sock


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_decisions_match_pipeline_decide(variant: str, seed: int) -> None:
    rng = random.Random(f"{variant}-{seed}")
    reference, compiled, lane, sock = pair(VARIANTS[variant], seed)
    fast = slow = 0
    decided_in_c: set[Reason] = set()
    v6_in_c = v1_in_c = acl_drops_in_c = signed_in_c = 0
    now_ns = 10 * NS_PER_S
    try:
        for step in range(1500):
            now_ns += int(rng.expovariate(1 / 60_000_000)) if rng.random() < 0.98 \
                else rng.choice((2, 30)) * NS_PER_S
            recv_ns = WALL_BASE_NS + now_ns + rng.randrange(1000)
            data = packet(rng)
            client = b"\x23" + data[1:48].ljust(47, b"\0")
            if "_nts" in VARIANTS[variant] and rng.random() < 0.1:   # an NTS client
                data = client + nts_fields(rng)
            elif "_auth" in VARIANTS[variant] and rng.random() < 0.05:   # a client with key 7
                data = mac.sign(KEY, client, digest_len=rng.choice((20, 32)))
            source = rng.choice(V4_SOURCES) if rng.random() < 0.9 else rng.choice(V6_SOURCES)
            port = rng.choice(PORTS)
            ttl = rng.choice(TTLS)
            reason, in_c, where, signed = decide_both(reference, compiled, lane, step, data,
                                                      source, port, recv_ns, now_ns, ttl)
            signed_in_c += in_c and signed
            if in_c:
                fast += 1
                decided_in_c.add(Reason(reason))
                v6_in_c += len(source) == 16 and reason in (Reason.ANSWERED, Reason.RATE_KOD)
                acl_drops_in_c += reason in (Reason.ACL_DENY, Reason.BLOCKLISTED)
                v1_in_c += len(data) == 48 and (data[0] >> 3) & 7 == 1 and reason in (
                    Reason.ANSWERED, Reason.RATE_LIMITED, Reason.LEAKED)
            else:
                slow += 1
            if step == 700:   # a reload and a blocklist change halfway, on both
                for pipeline in (reference, compiled):
                    pipeline.apply_policy(dataclasses.replace(
                        pipeline.policy, source_burst=pipeline.policy.source_burst + 1))
                    # An IPv6 entry too: from here on the compiled path looks every
                    # IPv6 source up in the list, as Python does.
                    pipeline.set_blocklist([
                        AclEntry(ipaddress.ip_network("203.0.113.6/32"), Action.DROP, "manual"),
                        AclEntry(ipaddress.ip_network("2001:db8::1/128"), Action.DROP,
                                 "manual")])
    finally:
        sock.close()
    assert lane.fast_decisions >= 5, (fast, slow)
    # The compiled core decides every datagram: a MAC fails where no key is configured
    # and is verified by Pipeline.verify_mac where keys are; NTS by the NTS stage.
    assert slow == 0 and Reason.AUTH_FAILED in decided_in_c, (slow, decided_in_c)
    if variant == "auth-nts":
        assert {Reason.NTS_NAK, Reason.NTS_REJECTED} <= decided_in_c, decided_in_c
    if variant.startswith("auth"):   # replies signed, in C, with the signer Python gave
        assert signed_in_c > 0
    if variant == "auth-required":
        # 203.0.113.0/24 must authenticate: its requests without a MAC are refused in C.
        assert Reason.AUTH_REQUIRED in decided_in_c, decided_in_c
    if variant in ("defaults", "tight-acl", "ipv6-prefix-60", "ipv6-128"):
        assert v6_in_c > 0   # established IPv6 sources decided in C (before step 700)
        assert v1_in_c > 0   # NTPv1 requests (labelled by source port) decided in C
    if variant == "tight-acl" and seed in (1, 3, 5):
        assert acl_drops_in_c > 0   # sources with a DROP entry (config, blocklist) too
    if variant in ("tight", "tight-acl", "no-global-cap", "prefix-20"):
        # Over-limit requests of established sources are decided in C too.
        # (the leak is drawn at random: test_floods_of_new_sources... sees it in C)
        assert {Reason.ANSWERED, Reason.RATE_KOD, Reason.RATE_LIMITED} <= decided_in_c, \
            decided_in_c


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@pytest.mark.parametrize("variant", ["defaults", "tight", "tight-acl"])
def test_clocks_at_the_int64_limits_are_decided_in_c_as_python_decides(variant: str) -> None:
    """Both sides read now_ns within [EARLIEST_NS, LATEST_NS], so a monotonic clock
    anywhere in int64 (and a wall clock anywhere, for the reply's timestamps) is still
    decided in C, exactly as the reference decides it."""
    rng = random.Random(variant)
    reference, compiled, lane, sock = pair(VARIANTS[variant], 4)
    edges = (INT64_MIN, INT64_MIN + 1, EARLIEST_NS - 1, EARLIEST_NS, -1, 0, LATEST_NS,
             LATEST_NS + 1, INT64_MAX - 1, INT64_MAX)
    now_ns = 0
    answered = 0
    try:
        for step in range(1200):
            if rng.random() < 0.1:
                now_ns = rng.choice(edges)
            else:   # creep (and clamp back into int64 as a clock reading must)
                now_ns = max(INT64_MIN, min(INT64_MAX, now_ns + rng.randrange(
                    -NS_PER_S, 5 * NS_PER_S)))
            recv_ns = rng.choice((WALL_BASE_NS + step, INT64_MIN, INT64_MAX, -1,
                                  rng.randrange(INT64_MIN, INT64_MAX)))
            data = bytes((0x23,)) + bytes(39) + step.to_bytes(8, "big")
            source = rng.choice(V4_SOURCES) if rng.random() < 0.8 else rng.choice(V6_SOURCES)
            reason, in_c, where, _ = decide_both(reference, compiled, lane, step, data, source,
                                                 rng.choice(PORTS[:3]), recv_ns, now_ns,
                                                 rng.choice(TTLS))
            assert in_c, where
            answered += reason == Reason.ANSWERED
    finally:
        sock.close()
    assert answered > 0


def test_junk_of_every_length_is_dropped_in_c_as_python_drops_it() -> None:
    """Datagrams that are not 48 bytes, as Python decides them: a length the sanity stage
    refuses, a first byte it refuses at any length, or a malformed tail is counted and
    dropped in C (a flood of junk must not cost a Pipeline.decide each). A well-formed
    longer request is decided in C too: its MAC fails where no key is configured and is
    verified by a call into Python where keys are; where NTS is on, C asks the NTS
    stage whether it claims the request and, if so, to decide it."""
    rng = random.Random(9)
    for setup in ("no keys", "keys", "nts"):
        reference, compiled, lane, sock = pair({} if setup != "keys" else {"_auth": "optional"}, 9)
        if setup == "nts":
            for pipeline in (reference, compiled):
                pipeline.nts = ChecksumNts()
        in_c_by_kind: dict[str, set[bool]] = {
            "short or odd": set(), "bad first byte": set(), "bad tail": set(),
            "with a mac": set(), "fields": set()}
        reasons: set[Reason] = set()
        try:
            for step in range(3000):
                length = rng.choice((0, 1, 4, 47, 49, 50, 52, 64, 68, 72, 100, 120))
                first = rng.choice((0x23, 0x1b, 0x0b, 0xe3, 0x26, 0x27, 0x00, 0x3f, 0x0c))
                header = bytes((first,)) + rng.randbytes(47)
                data = (header + (rng.randbytes(max(0, length - 48))
                                  if rng.random() < 0.5 or length < 52 else tail(rng)))[:length]
                if setup == "nts" and rng.random() < 0.2:   # an NTS client
                    first = 0x23
                    data = b"\x23" + header[1:] + nts_fields(rng)
                port = rng.choice(PORTS)
                request = inspect_request(data, port)
                kind = ("short or odd" if len(data) < 48 or len(data) % 4 else
                        "bad first byte" if first not in (0x23, 0x1b, 0x0b, 0xe3) else
                        "bad tail" if isinstance(request, Reason) else
                        "with a mac" if (request.mac_key_id is not None
                                         or request.whole_tail_mac is not None) else
                        "fields")
                reason, in_c, where, _ = decide_both(reference, compiled, lane, step, data,
                                                  rng.choice(V4_SOURCES), port,
                                                  WALL_BASE_NS + step, 10 * NS_PER_S + step,
                                                  64)
                reasons.add(Reason(reason))
                if len(data) != 48:
                    in_c_by_kind[kind].add(in_c)
        finally:
            sock.close()
        assert {Reason.MALFORMED, Reason.CRYPTO_NAK, Reason.ANSWERED} <= reasons, reasons
        for kind in ("short or odd", "bad first byte", "bad tail"):
            assert in_c_by_kind[kind] == {True}, (setup, kind)
        if setup == "no keys":
            assert Reason.AUTH_FAILED in reasons
            assert in_c_by_kind["with a mac"] == in_c_by_kind["fields"] == {True}
        else:   # decided in C: the MAC verified by Pipeline.verify_mac, NTS by its stage
            assert in_c_by_kind["with a mac"] == in_c_by_kind["fields"] == {True}
        if setup == "nts":
            assert {Reason.NTS_NAK, Reason.NTS_REJECTED} <= reasons, reasons


class ChecksumNts:
    """A deterministic NTS stage: claims requests whose first extension field is a
    Unique Identifier; decides by a checksum of the request (drop, NAK or answer), the
    answer's "fields" a tag of it."""

    @staticmethod
    def claims(request: bytes) -> bool:
        return request[48:50] == b"\x01\x04"

    @staticmethod
    def decide(request: bytes) -> tuple[str, Callable[[bytes], bytes] | None]:
        crc = zlib.crc32(request)
        if crc % 5 == 0:
            return "drop", None
        tag = crc.to_bytes(4, "big")
        return ("nak" if crc % 5 == 1 else "reply"), (lambda header: header + b"NTS!" + tag)


def test_the_compiled_path_rate_limits_and_caps_as_python_does() -> None:
    """One scripted flood: answers, a RATE KoD, drops inside the KoD guard time, leaks,
    then the global cap, every one decided in C and equal to Pipeline.decide."""
    settings = dict(source_rate=1.0, source_burst=2, prefix_rate=1000.0, prefix_burst=1000,
                    leak_one_in=3, kod_interval_s=4.0, global_reply_rate=3.0,
                    global_reply_burst=6)
    reference, compiled, lane, sock = pair(settings, 3)
    sources = [bytes((192, 0, 2, i)) for i in range(1, 5)]
    data = bytes((0x23, 0, 4)) + bytes(37) + b"XMTSTAMP"
    seen: dict[Reason, int] = {}
    try:
        now_ns = 50 * NS_PER_S
        for source in sources:   # first sightings: in C too
            expected = reference.decide(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            got = lane.decide_one(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            assert got[3] is True and got[:2] == expected[:2]
            assert compiled.snapshot() == reference.snapshot()
        assert lane.first_sightings == len(sources)
        for step in range(40):
            now_ns += NS_PER_S // 8
            source = sources[0] if step < 30 else sources[step % 4]
            expected = reference.decide(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            reason, reply, _, in_c = lane.decide_one(data, source, 40_000,
                                                     WALL_BASE_NS + now_ns, now_ns)
            assert in_c and (reason, reply) == expected[:2], step
            assert compiled.snapshot() == reference.snapshot(), step
            seen[Reason(reason)] = seen.get(Reason(reason), 0) + 1
            if reason == Reason.RATE_KOD:
                assert reply is not None and reply[12:16] == b"RATE" and reply[1] == 0
                assert reply[2] == 6 and reply[24:48] == b"XMTSTAMP" * 3   # poll: max(4, 6)
    finally:
        sock.close()
    assert set(seen) >= {Reason.ANSWERED, Reason.RATE_KOD, Reason.RATE_LIMITED,
                         Reason.LEAKED, Reason.GLOBAL_CAP}, seen


def test_access_list_entries_are_decided_in_c_as_python_decides() -> None:
    """Every action (drop, deny with its KoD, exempt, allow), a blocklist entry that
    expires and uncovers nothing, and IPv6 sources under IPv6 entries (looked up
    anew each time, as Python does): all in C, all as Pipeline.decide decides."""
    settings = dict(acl=(
        AclEntry(ipaddress.ip_network("192.0.2.4/32"), Action.DROP),
        AclEntry(ipaddress.ip_network("192.0.2.5/32"), Action.DENY),
        AclEntry(ipaddress.ip_network("192.0.2.6/32"), Action.EXEMPT),
        AclEntry(ipaddress.ip_network("192.0.2.8/32"), Action.ALLOW),
        AclEntry(ipaddress.ip_network("2001:db8:0:1::5/128"), Action.DENY),
        AclEntry(ipaddress.ip_network("2001:db8:0:1::/64"), Action.EXEMPT),
        AclEntry(ipaddress.ip_network("2001:db8:0:2::/64"), Action.DROP)),
        deny_action=Action.DENY, kod_interval_s=4.0, source_rate=0.5, source_burst=4)
    reference, compiled, lane, sock = pair(settings, 4)
    expires_ns = WALL_BASE_NS + 60 * NS_PER_S
    for pipeline in (reference, compiled):
        pipeline.set_blocklist([AclEntry(ipaddress.ip_network("192.0.2.7/32"), Action.DROP,
                                         "manual", "flood", expires_ns)])
    data = bytes((0x23, 0, 6)) + bytes(45)
    v4 = [bytes((192, 0, 2, n)) for n in (4, 5, 6, 7, 8)]
    v6 = [ipaddress.ip_address(a).packed for a in
          ("2001:db8:0:1::5", "2001:db8:0:1::6", "2001:db8:0:2::1", "2001:db8:0:3::1")]
    seen: dict[tuple[bytes, Reason], set[bool]] = {}
    try:
        now_ns = 10 * NS_PER_S
        for step in range(700):   # each source every 0.9 s, past the blocklist's expiry
            now_ns += NS_PER_S // 10
            source = (v4 + v6)[step % 9]
            expected = reference.decide(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            reason, reply, _, in_c = lane.decide_one(data, source, 40_000,
                                                     WALL_BASE_NS + now_ns, now_ns)
            assert (reason, reply) == expected[:2], step
            assert compiled.snapshot() == reference.snapshot(), step
            seen.setdefault((source, Reason(reason)), set()).add(in_c)
            if reason == Reason.DENY_KOD:
                assert reply is not None and reply[12:16] == b"DENY" and reply[1] == 0
    finally:
        sock.close()
    assert all(in_c == {True} for in_c in seen.values()), seen
    drop, deny, exempt, blocked, allow = v4
    assert set(seen) >= {(drop, Reason.ACL_DENY), (deny, Reason.DENY_KOD),
                         (deny, Reason.ACL_DENY),   # the KoD guard: one per 4 s
                         (exempt, Reason.ANSWERED), (blocked, Reason.BLOCKLISTED),
                         (blocked, Reason.ANSWERED),  # expired: answered from then on
                         (allow, Reason.ANSWERED), (allow, Reason.RATE_KOD),
                         (v6[0], Reason.DENY_KOD), (v6[1], Reason.ANSWERED),
                         (v6[2], Reason.ACL_DENY), (v6[3], Reason.RATE_KOD)}, sorted(seen)
    for source in (exempt, v6[1]):   # never rate limited
        assert {reason for key, reason in seen if key == source} == {Reason.ANSWERED}


FLOOD = dict(max_sources=40, max_prefixes=12, max_newcomers=25, source_rate=2.0,
             source_burst=3, prefix_rate=1.0, prefix_burst=4, global_reply_rate=0.0,
             kod_interval_s=1.0, kod_rate=5.0, kod_burst=3, leak_one_in=4)
FLOOD_ACL = (AclEntry(ipaddress.ip_network("10.0.3.0/24"), Action.DROP),
             AclEntry(ipaddress.ip_network("10.0.5.0/24"), Action.DENY),
             AclEntry(ipaddress.ip_network("10.0.7.0/24"), Action.EXEMPT),
             AclEntry(ipaddress.ip_network("10.0.9.0/24"), Action.ALLOW))
FLOOD_VARIANTS = {
    "flood": FLOOD,
    "flood-global-cap": dict(FLOOD, global_reply_rate=40.0, global_reply_burst=10),
    "flood-acl": dict(FLOOD, acl=FLOOD_ACL, deny_action=Action.DENY),
    "flood-no-kod-no-leak": dict(FLOOD, send_kod=False, leak_one_in=0),
    "flood-prefix-20": dict(FLOOD, ipv4_prefix=20, max_prefixes=5),
    "flood-default-limits": dict(max_sources=64, max_prefixes=16, max_newcomers=32),
}


def flood_source(rng: random.Random, serial: int) -> bytes:
    if rng.random() < 0.15:   # IPv6: each its own /64, a handful of /56s
        return ipaddress.IPv6Address(f"2001:db8:0:{serial % 5 * 256 + serial % 7:x}::1").packed \
            if rng.random() < 0.2 else \
            ipaddress.IPv6Address((0x2001_0db8_1000 << 80) | (serial << 64) | 1).packed
    return bytes((10, 0, (serial >> 4) & 0xFF, serial & 0xF))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("variant", sorted(FLOOD_VARIANTS))
def test_floods_of_new_sources_are_decided_in_c_as_python_decides(variant: str,
                                                                   seed: int) -> None:
    """Never-seen sources (most of them once), some returning within the ring's
    lifetime, a few offenders that keep their buckets drained, time jumps that
    refill everything: every first sighting of a plain request with no access-list
    entry (or a drop) is decided in C, with the same result, tables and ring."""
    rng = random.Random(f"{variant}-{seed}")
    reference, compiled, lane, sock = pair(FLOOD_VARIANTS[variant], seed)
    serial = 0
    recent: list[bytes] = []
    offenders = [bytes((10, 1, 0, i)) for i in range(4)]
    first_in_c = first_in_python = 0
    reasons: set[Reason] = set()
    acl_actions: set[Action | None] = set()
    now_ns = 10 * NS_PER_S
    try:
        for step in range(2500):
            now_ns += int(rng.expovariate(1 / 20_000_000)) if rng.random() < 0.995 \
                else rng.choice((3, 40)) * NS_PER_S
            recv_ns = WALL_BASE_NS + now_ns + rng.randrange(1000)
            kind = rng.random()
            if kind < 0.6 or not recent:
                serial += 1
                source = flood_source(rng, serial)
                recent = (recent + [source])[-40:]
            elif kind < 0.85:
                source = rng.choice(recent)      # a second sighting: maybe a promotion
            else:
                source = rng.choice(offenders)
            if rng.random() < 0.92:
                data = bytes((rng.choice((0x23, 0x23, 0x1B, 0x0B)), 0, 6)) + rng.randbytes(45)
            else:
                data = packet(rng)
            port = rng.choice(PORTS) if rng.random() < 0.1 else 40_000 + step % 7
            key = source if len(source) == 4 else source[: reference.compiled.v6_source_bytes]
            new = key not in reference.sources.records
            plain = (len(data) == 48 and data[0] in (0x23, 0x1B, 0x0B)
                     and port not in reference.compiled.reflection_ports
                     and (len(source) == 4 or not reference.acl.covers_ipv6()))
            entry = reference.acl.lookup(source, recv_ns)   # (before: it may expire)
            before = lane.first_sightings
            ttl = rng.choice(TTLS)
            reason, in_c, where, _ = decide_both(reference, compiled, lane, step, data, source,
                                                 port, recv_ns, now_ns, ttl)
            if lane.first_sightings > before:
                assert new and in_c, where
            if new and plain:
                assert in_c and lane.first_sightings == before + 1, where
                first_in_c += 1
                reasons.add(Reason(reason))
                acl_actions.add(None if entry is None else entry.action)
            elif new and not in_c:
                first_in_python += 1
    finally:
        sock.close()
    assert first_in_c > 1000, (first_in_c, first_in_python)
    # The table filled, the ring took over and wrapped, newcomers were promoted.
    assert compiled.newcomers.evictions > 0 and len(compiled.newcomers) > 0
    assert lane.promotions > 10 and compiled.sources.evictions > 0
    assert Reason.ANSWERED in reasons, reasons
    if variant != "flood-default-limits":   # (its prefix buckets are the default, generous)
        assert compiled.prefixes.admissions_refused > 0 and compiled.prefixes.evictions > 0
        assert Reason.RATE_LIMITED in reasons, reasons
        if "no-kod" not in variant:
            assert {Reason.RATE_KOD, Reason.LEAKED} <= reasons, reasons
    # No keys, no NTS: every first sighting is decided in C, whatever its length,
    # its MAC or its access-list entry.
    assert first_in_python == 0, first_in_python
    if variant == "flood-acl":
        assert Reason.ACL_DENY in reasons, reasons
        assert acl_actions == {None, *Action}, acl_actions


def test_a_full_table_of_drained_offenders_refuses_promotion_in_c_as_in_python() -> None:
    """Returning newcomers that find no evictable entry stay newcomers (table_full),
    limited by their remembered bucket; over it, a KoD first tries to establish them."""
    settings = dict(max_sources=4, max_newcomers=8, source_rate=1.0, source_burst=2,
                    prefix_rate=1e6, prefix_burst=10**6, leak_one_in=0, kod_interval_s=0.0)
    reference, compiled, lane, sock = pair(settings, 2)
    data = bytes((0x23, 0, 6)) + bytes(45)
    try:
        now_ns = 20 * NS_PER_S
        sources = [bytes((192, 0, 2, i)) for i in range(4)] * 3 + \
            [bytes((198, 51, 100, i % 3)) for i in range(30)]
        for source in sources:
            now_ns += 1000
            expected = reference.decide(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            got = lane.decide_one(data, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
            assert got[3] is True and got[:2] == expected[:2]
            assert compiled.snapshot() == reference.snapshot()
    finally:
        sock.close()
    assert compiled.table_full > 20 and compiled.sources.admissions_refused > 20
    assert lane.promotions == 0 and len(compiled.newcomers) == 3
    assert compiled.counters.by_reason()["rate_kod"] > 0


def test_the_compiled_newcomer_ring_keeps_the_python_rings_rules() -> None:
    assert NewcomerRing is not None
    rng = random.Random(9)
    keys = [rng.randbytes(rng.choice((1, 4, 7, 8, 9, 16))) for _ in range(60)]
    for size in (1, 5, 17):
        ring, model = NewcomerRing(size), PyNewcomerRing(size)
        for step in range(4000):
            key = rng.choice(keys)
            if rng.random() < 0.7:
                tat = rng.randrange(-(1 << 63), 1 << 63)
                ring.remember(key, tat)
                model.remember(key, tat)
            else:
                assert ring.discard(key) is model.discard(key)
            assert ring.get(key) == model.get(key) and (key in ring) is (key in model)
            if step % 50 == 0:
                assert ring.items() == model.items() and len(ring) == len(model)
                assert ring.evictions == model.evictions
        assert ring.items() == model.items() and ring.max_entries == size
    with pytest.raises(ValueError):
        ring.remember(bytes(17), 1)
    with pytest.raises(ValueError):
        NewcomerRing(0)
    with pytest.raises(KeyError):
        ring[b"never"]
    assert ring.get(b"") is None and b"" not in ring and ring.discard(bytes(20)) is False


def test_address_table_matches_an_ordered_dict_under_random_churn() -> None:
    """The compiled table against its model: membership, values, and the order
    (insertion, move_to_end, a replaced value keeping its place) through growth,
    backward-shift deletion and the second-chance scan BucketTable runs."""
    assert AddressTable is not None
    table = AddressTable()
    model: OrderedDict[bytes, object] = OrderedDict()
    rng = random.Random(5)
    # IPv4 sources and prefixes, IPv6 sources of every whole-byte length, b"6" + any
    # prefix (17 bytes at /128); all-zero keys and keys that differ only in length.
    keys = [rng.randbytes(rng.choice((1, 3, 4, 8, 9, 15, 16))) for _ in range(3000)]
    keys += [b"6" + rng.randbytes(16) for _ in range(300)]
    keys += [bytes(n) for n in range(1, 17)] + [b"6" + bytes(16), b"6" + bytes(7)]
    for step in range(60_000):
        key = rng.choice(keys)
        r = rng.random()
        if r < 0.5:
            value = object()
            table[key] = value
            model[key] = value
        elif r < 0.8:
            assert table.pop(key, None) is model.pop(key, None)
        elif r < 0.9 and model:
            oldest = next(iter(table))
            assert oldest == next(iter(model))
            table.move_to_end(oldest)
            model.move_to_end(oldest)
        else:
            assert (key in table) is (key in model)
            assert table.get(key) is model.get(key)
        if step % 997 == 0:
            assert [(k, id(v)) for k, v in table.items()] == \
                [(k, id(v)) for k, v in model.items()]
            assert list(table) == list(model) and table.keys() == list(model)
    assert len(table) == len(model)
    assert all(table.get(key) is model.get(key) for key in keys)
    assert [id(v) for v in table.values()] == [id(v) for v in model.values()]
    # What is not an address key is refused, never stored.
    for bad in (b"", bytes(18), b"7" + bytes(16)):
        with pytest.raises(ValueError):
            table[bad] = 1
        assert bad not in table and table.get(bad) is None
        with pytest.raises(KeyError):
            table[bad]
    with pytest.raises(TypeError):
        table["1234"]   # type: ignore[index]
    with pytest.raises(KeyError):
        del table[bytes(5) + b"x"]
    with pytest.raises(KeyError):
        table.pop(bytes(6) + b"y")
    iterator = iter(table)
    table[b"new key"] = 1
    with pytest.raises(RuntimeError):
        next(iterator)
    table.clear()
    assert len(table) == 0 and table.items() == [] and list(table) == []


def test_clock_changes_reach_the_compiled_replies() -> None:
    reference, compiled, lane, sock = pair({}, 1)
    try:
        request = bytes((0x23, 0, 6)) + bytes(37) + b"ORIGIN!!"
        source = bytes((192, 0, 2, 1))
        for clock in (CLOCK, dataclasses.replace(CLOCK, stratum=5, offset_ns=7_000_000_123,
                                                 refid=b"PPS\0")):
            for pipeline in (reference, compiled):
                pipeline.responder.set_clock(clock, WALL_BASE_NS + 5 * NS_PER_S)
            for i in range(3):   # the first one establishes the source in Python
                now_ns = (20 + i) * NS_PER_S
                expected = reference.decide(request, source, 40_000, WALL_BASE_NS + now_ns,
                                            now_ns)
                got = lane.decide_one(request, source, 40_000, WALL_BASE_NS + now_ns, now_ns)
                assert got[:2] == expected[:2]
            assert got[3] is True
            assert got[1] is not None and got[1][1] == clock.stratum
    finally:
        sock.close()


# ---------------------------------------------------------------------- on real sockets


def request(xmt: int, first: int = 0x23) -> bytes:
    return bytes((first, 0, 6)) + bytes(37) + xmt.to_bytes(8, "big")


def serve_once(server: Server, sock: socket.socket) -> None:
    time.sleep(0.05)
    server._on_datagrams(sock)


def test_a_real_server_answers_on_the_compiled_path() -> None:
    sock = open_socket(ListenSpec("127.0.0.1", 0))
    source = LocalClock()
    now = time.time_ns()
    pipeline = Pipeline(FilterPolicy(source_rate=1e6, source_burst=10**6),
                        Responder(source.state(now), now))
    server = Server([sock], pipeline, source)
    lane = server.batched[sock]
    assert isinstance(lane, fastlane.FastLane)
    # Replies carry DF (server.set_dont_fragment).
    assert sock.getsockopt(socket.IPPROTO_IP, server_module.IP_MTU_DISCOVER) == \
        server_module.IP_PMTUDISC_DO
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    try:
        client.sendto(request(1), sock.getsockname())    # a first sighting: in C too
        serve_once(server, sock)
        assert lane.fast_decisions == 1 and lane.first_sightings == 1
        client.recv(100)
        before = time.time_ns()
        batch = [request(0x100 + i) for i in range(150)] + [request(9, first=0x26)] * 3
        for data in batch:
            client.sendto(data, sock.getsockname())
        after = time.time_ns()
        serve_once(server, sock)
        assert lane.fast_decisions == 151
        assert pipeline.counters.by_reason() == {"answered": 151, "control_mode": 3}
        replies = [client.recv(100) for _ in range(150)]
        assert sorted(int.from_bytes(r[24:32], "big") for r in replies) == \
            [0x100 + i for i in range(150)]
        for reply in replies:
            assert len(reply) == 48 and reply[0] & 7 == 4 and reply[1] == 10
            receive_ns = ntp_to_unix_ns(int.from_bytes(reply[32:40], "big"), before)
            transmit_ns = ntp_to_unix_ns(int.from_bytes(reply[40:48], "big"), before)
            assert before - 1000 <= receive_ns <= after + 1000   # the kernel's stamp
            assert receive_ns <= transmit_ns <= time.time_ns() + 1000
        chunks = {reply[40:48] for reply in replies}
        assert 2 <= len(chunks) <= -(-150 // fastlane.STAMP_EVERY) + 1
        record = pipeline.sources.records[socket.inet_aton("127.0.0.1")]
        assert record[1] == record[2] == 151   # requests, time replies (mode 6: no record)
        assert pipeline.counters.bytes_in == 154 * 48
        assert pipeline.counters.bytes_out == 151 * 48
    finally:
        client.close()
        sock.close()


def test_the_compiled_loop_takes_new_sources_into_the_table_and_then_the_ring() -> None:
    """On loopback from five addresses, a two-source table: two first requests go in,
    three wait in the newcomer ring, their second requests are promoted; all in C."""
    sock = open_socket(ListenSpec("127.0.0.1", 0))
    source = LocalClock()
    now = time.time_ns()
    pipeline = Pipeline(FilterPolicy(max_sources=2), Responder(source.state(now), now))
    server = Server([sock], pipeline, source)
    lane = server.batched[sock]
    assert isinstance(lane, fastlane.FastLane)
    clients = []
    try:
        for i in range(1, 6):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind((f"127.0.0.{i}", 0))
            client.settimeout(2)
            clients.append(client)
            client.sendto(request(i), sock.getsockname())
        serve_once(server, sock)
        assert [c.recv(100)[24:32] for c in clients] == [i.to_bytes(8, "big") for i in range(1, 6)]
        assert lane.first_sightings == 5 and lane.fast_decisions == 5
        assert len(pipeline.sources) == 2 and len(pipeline.newcomers) == 3
        time.sleep(0.02)
        clients[4].sendto(request(6), sock.getsockname())   # a full table, no room yet
        serve_once(server, sock)
        clients[4].recv(100)
        assert lane.first_sightings == 6 and lane.promotions == 0
        assert pipeline.table_full == 1 and len(pipeline.newcomers) == 3
        assert pipeline.counters.by_reason() == {"answered": 6}
    finally:
        for client in clients:
            client.close()
        sock.close()


def test_reload_and_blocklist_apply_to_the_compiled_path() -> None:
    sock = open_socket(ListenSpec("127.0.0.1", 0))
    source = LocalClock()
    now = time.time_ns()
    pipeline = Pipeline(FilterPolicy(), Responder(source.state(now), now))
    server = Server([sock], pipeline, source)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(0.5)
    try:
        for i in range(2):
            client.sendto(request(i), sock.getsockname())
            serve_once(server, sock)
            client.recv(100)
        pipeline.set_blocklist([AclEntry(ipaddress.ip_network("127.0.0.1/32"), Action.DROP,
                                         "manual")])
        client.sendto(request(5), sock.getsockname())
        serve_once(server, sock)
        with pytest.raises(TimeoutError):
            client.recv(100)
        assert pipeline.counters.by_reason()["blocklisted"] == 1
        pipeline.set_blocklist([])
        # A reload that makes port 40000-ish clients reflection ports: every port.
        client_port = client.getsockname()[1]
        pipeline.apply_policy(dataclasses.replace(
            pipeline.policy, reflection_ports=frozenset({client_port})))
        client.sendto(request(6), sock.getsockname())
        serve_once(server, sock)
        with pytest.raises(TimeoutError):
            client.recv(100)
        assert pipeline.counters.by_reason()["reflection_port"] == 1
    finally:
        client.close()
        sock.close()


def test_tables_in_python_leave_every_packet_to_python() -> None:
    """A pipeline whose tables are OrderedDicts (the reference model's) has no
    AddressTable for the loop to use: the lane configures, and decides nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL_BASE_NS))
        pipeline.sources.records = OrderedDict()
        lane = fastlane.FastLane(sock, pipeline)
        request = bytes((0x23, 0, 6)) + bytes(45)
        for i in range(3):
            reason, reply, _, in_c = lane.decide_one(request, bytes((192, 0, 2, 1)), 40_000,
                                                     WALL_BASE_NS, (10 + i) * NS_PER_S)
            assert (reason, in_c) == (Reason.ANSWERED, False) and reply is not None
        assert list(pipeline.sources.records) == [bytes((192, 0, 2, 1))]
    finally:
        sock.close()


def test_a_record_the_filter_did_not_write_is_an_error_not_a_handoff() -> None:
    """The core decides every packet, or raises: it never passes one to Python
    because its state looks odd. The server counts such a batch as a decision error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL_BASE_NS))
        lane = fastlane.FastLane(sock, pipeline)
        request = bytes((0x23, 0, 6)) + bytes(45)
        source, other = bytes((192, 0, 2, 1)), bytes((192, 0, 2, 2))
        assert lane.decide_one(request, source, 40_000, WALL_BASE_NS, NS_PER_S)[3] is True
        record = pipeline.sources.records[source]
        for cell, odd in ((3, "three"), (0, (1 << 62) + 1)):   # not an int; a time out of range
            kept = record[cell]
            record[cell] = odd
            with pytest.raises(TypeError, match="did not write"):
                lane.decide_one(request, source, 40_000, WALL_BASE_NS, 2 * NS_PER_S)
            record[cell] = kept
        pipeline.sources.records[other] = list(record)   # a list, not a Record
        with pytest.raises(TypeError, match="source record the filter did not write"):
            lane.decide_one(request, other, 40_000, WALL_BASE_NS, 2 * NS_PER_S)
        del pipeline.sources.records[other]
        assert lane.decide_one(request, source, 40_000, WALL_BASE_NS, 3 * NS_PER_S)[::3] == \
            (Reason.ANSWERED, True)
    finally:
        sock.close()


def with_settings(policy: LanePolicy, **changes: Any) -> LanePolicy:
    return dataclasses.replace(policy, settings=dataclasses.replace(policy.settings, **changes))


def with_objects(policy: LanePolicy, **changes: Any) -> LanePolicy:
    return dataclasses.replace(policy, objects=dataclasses.replace(policy.objects, **changes))


def test_bad_configuration_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL_BASE_NS))
        lane = fastlane.FastLane(sock, pipeline)
        policy = pipeline.lane_policy()
        without_sources = types.SimpleNamespace(**{
            field.name: getattr(policy.objects, field.name)
            for field in dataclasses.fields(policy.objects) if field.name != "sources"})
        with pytest.raises(AttributeError, match=r"^lane policy has no objects\.sources$"):
            lane.lane.configure(dataclasses.replace(
                policy, objects=without_sources))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"settings\.drop_reason must be 256 bytes"):
            lane.lane.configure(with_settings(policy, drop_reason=b"short"))
        contract = policy.contract
        cells = contract.cells._replace(last_kod=99)
        with pytest.raises(ValueError, match=r"contract\.cells\.last_kod is outside the record"):
            lane.lane.configure(dataclasses.replace(
                policy, contract=dataclasses.replace(contract, cells=cells)))
        for wide in (dict(latest_ns=1 << 62), dict(earliest_ns=-(1 << 62)),
                     dict(never=contract.earliest_ns)):
            # a clock range whose arithmetic could leave int64
            with pytest.raises(ValueError, match="overflow int64"):
                lane.lane.configure(dataclasses.replace(
                    policy, contract=dataclasses.replace(contract, **wide)))
        with pytest.raises(ValueError):   # a crowd estimate above max_crowd
            lane.lane.configure(with_settings(policy, crowd_of_bits=(1,) * 63 + (10**6,)))
        with pytest.raises(TypeError, match=r"objects\.counts must be a Counts"):
            lane.lane.configure(with_objects(policy, counts=(0,) * len(policy.objects.counts)))
        with pytest.raises(ValueError, match="counts"):   # not one per (version, reason)
            lane.lane.configure(with_objects(policy, counts=type(policy.objects.counts)(3)))
        with pytest.raises(TypeError, match=r"objects\.budgets must be a Record of 2 cells"):
            lane.lane.configure(with_objects(policy, budgets=[0, 0]))
        labels = policy.objects.label_counts
        listed = LabelCounts(labels.labels)
        listed.counts = [0] * len(labels)
        with pytest.raises(TypeError, match=r"label_counts\.counts must be a Counts"):
            lane.lane.configure(with_objects(policy, label_counts=listed))
        with pytest.raises(ValueError, match="has no count"):   # a label the loop can give
            lane.lane.configure(with_objects(policy, label_counts=LabelCounts(
                label for label in labels.labels if label != fingerprint.NTPV4)))
        with pytest.raises(RuntimeError):   # refused config leaves it unconfigured
            lane.lane.decide_one(bytes(48), bytes(4), 1, 0, 0)
        lane.lane.configure(policy)
        assert lane.lane.decide_one(bytes((0x26,)) + bytes(47), bytes(4), 1, 0, 0)[:2] == \
            (Reason.CONTROL_MODE, None)
    finally:
        sock.close()


@pytest.mark.parametrize(("part", "field", "wrong"), [
    ("settings", "send_kod", 1),                     # a flag must be a bool, not an int
    ("objects", "enabled", None),
    ("settings", "interval_ns", (1.5,) * 258),       # ints, not floats
    ("settings", "labels", ["ntpv4"] * 258),         # a tuple, not a list
    ("settings", "leak_share", "0.5"),
    ("settings", "max_crowd", 2**64),                # does not fit 64 bits
])
def test_a_field_of_the_wrong_type_is_a_type_error_naming_it(
        part: str, field: str, wrong: object) -> None:
    """configure refuses it (no crash) and is left unconfigured; the next good policy
    takes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL_BASE_NS))
        lane = fastlane.FastLane(sock, pipeline)
        policy = pipeline.lane_policy()
        lane.lane.configure(policy)
        bad = (with_settings if part == "settings" else with_objects)(policy, **{field: wrong})
        with pytest.raises(TypeError, match=rf"^lane policy: {part}\.{field} must "):
            lane.lane.configure(bad)
        with pytest.raises(RuntimeError):
            lane.lane.decide_one(bytes(48), bytes(4), 1, 0, 0)
        lane.lane.configure(policy)
        assert lane.lane.decide_one(bytes((0x26,)) + bytes(47), bytes(4), 1, 0, 0)[:2] == \
            (Reason.CONTROL_MODE, None)
    finally:
        sock.close()


def test_the_lane_policy_is_immutable() -> None:
    pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, WALL_BASE_NS))
    policy = pipeline.lane_policy()
    for part, field in ((policy, "settings"), (policy.settings, "send_kod"),
                        (policy.objects, "enabled"), (policy.contract, "record_len")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, field, None)
    with pytest.raises(AttributeError):   # a NamedTuple's fields are read-only
        policy.contract.cells.tat = 1  # type: ignore[misc]
    # Slotted: no stray attribute can be added beside the typed fields.
    with pytest.raises(AttributeError):
        object.__setattr__(policy.settings, "extra", ())
    # Settings are compiled once per policy; the live objects are the pipeline's own.
    again = pipeline.lane_policy()
    assert again.settings is policy.settings and again.contract is policy.contract
    assert again.objects.counts is pipeline.counters.counts and again.objects.enabled
    assert policy.disabled().objects.enabled is False and policy.objects.enabled


# ---------------------------------------------------------------------- waiting in C


def lane_on_loopback() -> tuple[fastlane.FastLane, socket.socket, socket.socket]:
    sock = open_socket(ListenSpec("127.0.0.1", 0))
    sock.setblocking(False)
    pipeline = Pipeline(FilterPolicy(source_rate=1e6, source_burst=10**6),
                        Responder(CLOCK, WALL_BASE_NS))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    return fastlane.FastLane(sock, pipeline), sock, client


def pump(lane: fastlane.FastLane, wait_s: float, watch: tuple[int, ...] = (),
         published: list[tuple[int, int, int, int]] | None = None) -> tuple[int, float]:
    start = time.monotonic()
    handled, _, _ = lane.pump(lambda: bytes(8), time.time_ns, 10_000,
                              time.monotonic_ns() + int(wait_s * 1e9), watch,
                              None if published is None else
                              lambda *counted: published.append(counted))
    return handled, time.monotonic() - start


def test_the_compiled_loop_waits_for_datagrams_until_its_deadline() -> None:
    lane, sock, client = lane_on_loopback()
    try:
        def trickle() -> None:
            for i in range(5):
                time.sleep(0.05)
                client.sendto(request(i), sock.getsockname())

        sender = threading.Thread(target=trickle)
        sender.start()
        published: list[tuple[int, int, int, int]] = []
        handled, elapsed = pump(lane, 0.6, (), published)
        sender.join()
        # One call answered all five, arriving 50 ms apart, then waited out its time.
        assert handled == 5 and 0.5 <= elapsed < 5
        assert len({client.recv(100)[24:32] for _ in range(5)}) == 5
        # Before each wait what was counted went out (metrics read it meanwhile);
        # published and returned add up to every byte, counted once.
        counters = lane.pipeline.counters
        assert published and all(p[:2] == (0, 0) for p in published)
        assert sum(p[2] for p in published) + counters.bytes_in == 5 * 48
        assert sum(p[3] for p in published) + counters.bytes_out == 5 * 48
        assert counters.by_reason() == {"answered": 5}
    finally:
        client.close()
        sock.close()


def test_the_wait_ends_when_another_descriptor_or_a_signal_needs_python() -> None:
    lane, sock, client = lane_on_loopback()
    wake_read, wake_write = socket.socketpair()
    received: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, _frame: received.append(signum))
    try:
        timer = threading.Timer(0.05, wake_write.send, (b"x",))
        timer.start()
        handled, elapsed = pump(lane, 3.0, (wake_read.fileno(),))
        timer.join()
        assert handled == 0 and elapsed < 2.0
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        handled, elapsed = pump(lane, 3.0)
        assert handled == 0 and elapsed < 2.0 and received == [signal.SIGALRM]
        assert pump(lane, -1.0)[0] == 0    # a deadline already past: no wait at all
        with pytest.raises(ValueError):
            pump(lane, 0.1, (-5,))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        wake_read.close()
        wake_write.close()
        client.close()
        sock.close()


def test_the_loop_reads_and_writes_the_pipelines_budgets_in_place() -> None:
    # One copy of the global reply and KoD budgets: what the loop charges is in
    # Pipeline.budgets at once (no copy back at the end of a pump), and what Python
    # writes there the loop sees at the next packet.
    _, compiled, lane, sock = pair({"global_reply_rate": 10.0, "global_reply_burst": 1}, 1)
    try:
        request, now = bytes((0x23,)) + bytes(47), 10 * NS_PER_S
        budgets = compiled.budgets
        reason, reply, _, _ = lane.decide_one(request, bytes((192, 0, 2, 1)), 40000,
                                              WALL_BASE_NS + now, now)
        assert reason == Reason.ANSWERED and reply is not None
        assert budgets[GLOBAL_TAT] == now + NS_PER_S // 10   # one reply charged
        budgets[GLOBAL_TAT] = now + 60 * NS_PER_S            # the budget spent, by Python
        reason, reply, _, _ = lane.decide_one(request, bytes((192, 0, 2, 2)), 40000,
                                              WALL_BASE_NS + now, now)
        assert reason == Reason.GLOBAL_CAP and reply is None
        budgets[GLOBAL_TAT] = 0                               # ... and refilled
        reason, _, _, _ = lane.decide_one(request, bytes((192, 0, 2, 3)), 40000,
                                          WALL_BASE_NS + now, now)
        assert reason == Reason.ANSWERED and compiled.budgets is budgets
    finally:
        sock.close()


def test_the_loop_counts_in_the_pipelines_own_counts() -> None:
    # By (version, reason) and by label, the loop adds to the Counts the pipeline
    # reads: the same objects, moved by each decision.
    _, compiled, lane, sock = pair({}, 1)
    try:
        counts, labels = compiled.counters.counts, compiled.label_counts
        now = 10 * NS_PER_S
        for host in range(3):
            lane.decide_one(bytes((0x23,)) + bytes(47), bytes((192, 0, 2, host)), 40000,
                            WALL_BASE_NS + now, now)
        lane.decide_one(bytes((0x26,)) + bytes(47), bytes((192, 0, 2, 9)), 40000,
                        WALL_BASE_NS + now, now)
        assert compiled.counters.counts is counts and compiled.label_counts is labels
        assert counts[4 * len(Reason) + Reason.ANSWERED] == 3
        assert counts[4 * len(Reason) + Reason.CONTROL_MODE] == 1
        assert labels[fingerprint.NTPV4] == 3 and sum(labels.values()) == 3
        with pytest.raises(KeyError):
            labels["no such label"] += 1
        with pytest.raises(TypeError):
            del labels[fingerprint.NTPV4]
        assert dict(labels) == {label: 3 if label == fingerprint.NTPV4 else 0
                                for label in labels.labels}
    finally:
        sock.close()


def test_a_failed_start_of_a_decision_keeps_pythons_buckets_and_its_error() -> None:
    # begin() refuses a global TAT past 64 bits (only Python's unbounded arithmetic makes
    # one): the error must surface as it is, and the budgets stay as Python left them.
    reference, compiled, lane, sock = pair({}, 1)
    try:
        source, now = bytes((192, 0, 2, 1)), 10 * NS_PER_S
        lane.decide_one(bytes((0x23,)) + bytes(47), source, 40000, WALL_BASE_NS + now, now)
        kod_tat = compiled.budgets[KOD_TAT]
        compiled.budgets[GLOBAL_TAT] = (1 << 63) + 5
        with pytest.raises(TypeError, match="64 bits"):
            lane.decide_one(bytes((0x23,)) + bytes(47), source, 40000, WALL_BASE_NS + now,
                            2 * now)
        assert list(compiled.budgets) == [(1 << 63) + 5, kod_tat]
    finally:
        sock.close()
