#!/usr/bin/env python3
"""A bounded differential fuzz of the compiled packet decision (``guardntp/_fastlane.c``).

Every datagram goes through ``FastLane.decide_one`` (the C ``Lane.decide_one``) on one
pipeline, and through ``Pipeline.decide`` alone on a twin (whose newcomers live in the
pure-Python ring). The two must agree on (reason, reply, signer) for every datagram and
on every counter and record after it (the touched records after each step, everything
every ``--check-every`` steps and at the end of each episode). A datagram the compiled
core hands to ``Pipeline.decide`` instead of deciding it, and anything either side
raises, are failures too.

The run is a sequence of *episodes*, each a fresh pair under one policy (round robin
over ``POLICIES``), seeded by ``(--seed, episode)`` only: what an episode does never
depends on the time it was given, so ``--seed S --episode E --steps N`` replays it.
Traffic: random bytes of 0-600 bytes; 48-byte requests of every LI/version/mode and
mutations of them; MAC-sized tails (some valid, key 7), crypto-NAKs; NTS-looking and
other extension fields; from a small pool of IPv4/IPv6 sources (records reused) and
fresh ones (tables fill, evict, the newcomer ring wraps, returning newcomers are
promoted); ports 0, 123, 23457, reflection ports, random ones; TTLs -1..255; a
monotonic clock that mostly creeps forward but jumps, goes backwards and visits the
int64 limits; reloads (``apply_policy``), blocklist changes and clock changes.

Usage (from the repository root; ``tools/fuzz_fastlane.sh`` runs it under ASan):
    .venv/bin/python tools/fuzz_fastlane.py [--seconds 60] [--steps N] [--seed S]
    .venv/bin/python tools/fuzz_fastlane.py --seed S --episode E --steps N --check-every 1
Exit status: 0 clean, 1 a mismatch or an exception (one ``REPRODUCE:`` line on stderr),
2 a usage error.

Self-test hook (``tools/fuzz_fastlane.sh --self-test``): ``GUARDNTP_FUZZ_INJECT`` =
``mismatch:N`` (falsify the expected reply at step N of episode 0), ``state:N``
(corrupt a counter of the reference), ``asan:N`` (a heap use-after-free through ctypes,
only where ASan is loaded) or ``ubsan:N`` (call the UBSan-instrumented helper named by
``GUARDNTP_FUZZ_UBSAN_HELPER`` with an overflowing argument).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import ipaddress
import os
import random
import socket
import sys
import time
import traceback
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from guardntp import fastlane
from guardntp.auth import mac
from guardntp.auth.keys import parse_key_line
from guardntp.auth.server import KeyAuthenticator
from guardntp.clock import ClockState, Leap
from guardntp.filter.acl import AclEntry, Action
from guardntp.filter.buckets import PyNewcomerRing
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import DEFAULT_REFLECTION_PORTS, BadPolicy, FilterPolicy, LabelPolicy
from guardntp.filter.reference import NEVER
from guardntp.filter.reference import prefix_key as prefix_key_of
from guardntp.responder import Responder
from guardntp.timestamps import NS_PER_S
from guardntp.verdicts import Reason

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
#: --times headroom: now_ns stays within [-2**61, 2**62], a little beyond the range
#: the filter reads it in (pipeline.EARLIEST_NS..LATEST_NS); the default goes to the
#: int64 limits.
HEADROOM = (-(1 << 61), 1 << 62)
TIMES = ("limits", "headroom", "ordinary")
WALL_BASE_NS = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=1_000_000, root_dispersion_ns=2_000_000,
                   reference_unix_ns=WALL_BASE_NS - NS_PER_S, offset_ns=-1_234_567)
KEY = parse_key_line("7 SHA256 HEX:" + "ab" * 32)
assert KEY is not None


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


ACL = (AclEntry(net("198.51.100.0/24"), Action.DENY),
       AclEntry(net("192.0.2.77/32"), Action.EXEMPT),
       AclEntry(net("192.0.2.4/32"), Action.DROP),
       AclEntry(net("10.0.3.0/24"), Action.DROP),
       AclEntry(net("10.0.7.0/24"), Action.EXEMPT),
       AclEntry(net("10.0.9.0/24"), Action.ALLOW),
       AclEntry(net("2001:db8:0:1::/64"), Action.DROP))
TIGHT_TABLES = dict(max_sources=6, max_prefixes=3, max_newcomers=4)
TIGHT_LIMITS = dict(source_rate=2.0, source_burst=3, prefix_rate=6.0, prefix_burst=8,
                    global_reply_rate=25.0, global_reply_burst=5, kod_interval_s=1.0,
                    kod_rate=3.0, kod_burst=2)

#: Base policies, one per episode in turn; reloads drift from them. ``_auth``: a
#: KeyAuthenticator with key 7 ("optional": nobody must authenticate), ``_nts``: a
#: deterministic stand-in for the NTS stage.
POLICIES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "tight-tables": dict(TIGHT_TABLES),
    "leak": dict(TIGHT_LIMITS, leak_one_in=2),
    "acl": dict(acl=ACL, deny_action=Action.DENY),
    "no-crowd": dict(TIGHT_TABLES, max_crowd=1),
    "no-ttl-classes": dict(TIGHT_LIMITS, ttl_classes=False),
    "tight-everything": dict(TIGHT_TABLES, **TIGHT_LIMITS, leak_one_in=4, acl=ACL,
                             ipv4_prefix=20, ipv6_prefix=60),
    "auth": dict(TIGHT_TABLES, **TIGHT_LIMITS, _auth="optional"),
    "auth-nts": dict(TIGHT_TABLES, _auth="optional", _nts=True),
}

V4_POOL = [bytes((192, 0, 2, i)) for i in (1, 2, 3, 4, 77)] + \
          [bytes((198, 51, 100, i)) for i in (1, 9)] + \
          [bytes((203, 0, 113, i)) for i in (5, 6)] + \
          [bytes((10, 0, 3, 1)), bytes((10, 0, 7, 2)), bytes((10, 0, 9, 3)), bytes(4),
           bytes((255,) * 4)]
V6_POOL = [ipaddress.IPv6Address(a).packed for a in (
    "2001:db8::1", "2001:db8::2",            # one /64: one source key
    "2001:db8:0:1::5", "2001:db8:0:ff::1",   # same /56 as the above
    "2001:db8:1::1", "::ffff:192.0.2.1",     # an IPv4-mapped address (as IPv6 here)
    "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")]
REFLECTION = sorted(DEFAULT_REFLECTION_PORTS)
CLIENT_FIRSTS = (0x23, 0x23, 0x23, 0x23, 0x1B, 0x1B, 0x0B, 0xE3, 0x1B, 0x13, 0x0B, 0x08,
                 0x09, 0x19, 0x21, 0xE3, 0xDB, 0x24, 0x26, 0x27, 0x20, 0x03, 0x3B, 0x0E, 0x17)
NTS_TYPES = (0x0104, 0x0204, 0x0304, 0x0404)



class Failure(Exception):
    """A disagreement (or an exception) at one step."""


class FakeNts:
    """A deterministic NTS stage: claims requests whose first extension field is a
    Unique Identifier, and decides by a checksum of the request."""

    def claims(self, request: bytes) -> bool:
        return request[48:50] == b"\x01\x04"

    def decide(self, request: bytes) -> tuple[str, Callable[[bytes], bytes] | None]:
        crc = zlib.crc32(request)
        if crc % 5 == 0:
            return "drop", None
        tag = crc.to_bytes(4, "big")
        return ("nak" if crc % 5 == 1 else "reply"), (lambda header: header + b"NTS!" + tag)


def authenticator(mode: str | None) -> KeyAuthenticator | None:
    if mode is None:
        return None
    assert KEY is not None
    require = [net("203.0.113.0/24")] if mode == "required" else []
    return KeyAuthenticator({KEY.key_id: KEY}, require=require)


def python_tables(pipeline: Pipeline) -> None:
    """Keep the reference's tables in OrderedDicts, the model of the compiled AddressTable."""
    for table in (pipeline.sources, pipeline.prefixes):
        if not isinstance(table.records, OrderedDict):
            table.records = OrderedDict(table.records.items())


def python_ring(pipeline: Pipeline) -> None:
    """Keep the reference's newcomers in the pure-Python ring (a resize makes a C one)."""
    ring = pipeline.newcomers.ring
    if isinstance(ring, PyNewcomerRing):
        return
    model = PyNewcomerRing(ring.max_entries)
    for key, tat in ring.items():
        model.remember(key, tat)
    model.evictions = ring.evictions
    pipeline.newcomers.ring = model


def quick_state(pipeline: Pipeline, key: bytes, prefix_key: bytes) -> dict[str, object]:
    """What one datagram can change that is cheap to read: counters, sizes, the
    source's and its prefix's records, its newcomer entry, the shared buckets."""
    record = pipeline.sources.records.get(key)
    prefix = pipeline.prefixes.records.get(prefix_key)
    return {
        "counts": list(pipeline.counters.counts),
        "labels": dict(pipeline.label_counts),
        "record": None if record is None else list(record),
        "prefix": None if prefix is None else list(prefix),
        "newcomer": pipeline.newcomers.get(key),
        "sizes": (len(pipeline.sources), len(pipeline.prefixes), len(pipeline.newcomers)),
        "evictions": (pipeline.sources.evictions, pipeline.prefixes.evictions,
                      pipeline.newcomers.evictions),
        "refused": (pipeline.sources.admissions_refused, pipeline.prefixes.admissions_refused),
        "oldest": (next(iter(pipeline.sources.records), None),
                   next(iter(pipeline.prefixes.records), None)),
        "prefix_overflow": list(pipeline._prefix_overflow),
        "budgets": list(pipeline.budgets),
        "table_full": pipeline.table_full,
    }


def differences(expected: dict[str, object], got: dict[str, object]) -> str:
    parts = [f"{name}: python {expected[name]!r:.300} != compiled {got[name]!r:.300}"
             for name in expected if expected[name] != got[name]]
    return "; ".join(parts)


# ---------------------------------------------------------------------- traffic


class Traffic:
    """The datagrams, sources, ports, TTLs and clocks of one episode, from one RNG."""

    def __init__(self, rng: random.Random, times: str, wild_recv: bool) -> None:
        self.rng = rng
        self.times = times
        self.wild_recv = wild_recv
        self.now_ns = rng.randrange(0, 10**12)
        self.wall_ns = WALL_BASE_NS + rng.randrange(10**12)
        # The mean gap between datagrams, per episode: from a flood to a trickle in
        # which the pool's sources are mostly within their limits.
        self.pace_ns = rng.choice((2_000_000, 20_000_000, 200_000_000, 2 * NS_PER_S))
        self.wild = rng.random() < 1 / 3
        self.serial = 0
        self.recent: list[bytes] = []
        #: a source's usual (port, ttl), and whether it keeps to them
        self.home: dict[bytes, tuple[int, int, bool]] = {}
        self.last: dict[bytes, bytes] = {}             # a source's last datagram
        self.extremes = 0

    # -- time
    def tick(self) -> tuple[int, int]:
        """The next datagram's (recv_ns, now_ns). In most episodes the monotonic clock
        creeps forward with jumps ahead and small steps back. In a *wild* episode it
        also leaps far back, visits the far ends of its range (--times) and returns,
        and the wall clock visits the int64 limits (unless --no-wild-recv): after
        which most buckets stay drained, so only a third of the episodes are wild."""
        rng = self.rng
        wild = self.wild
        r = rng.random()
        if r < 0.93:
            delta = int(rng.expovariate(1 / self.pace_ns)) if rng.random() < 0.9 \
                else rng.randrange(0, 1000)
        elif r < 0.95:
            delta = rng.choice((1, 2, 16, 64, 2048, 3600, 86_400, 10 * 365 * 86_400)) \
                * NS_PER_S + rng.randrange(NS_PER_S)
        elif r < 0.96:
            delta = -rng.choice((1, 1000, 10**6, 10**6, NS_PER_S // 10, NS_PER_S))
        elif not wild:
            delta = 0
        elif r < 0.98:
            delta = -rng.choice((60 * NS_PER_S, 3600 * NS_PER_S, 10**17))
        elif r < 0.99 and self.times != "ordinary":
            self.extremes += 1
            small = rng.randrange(1 << rng.randrange(1, 48))
            if self.times == "limits":
                self.now_ns = rng.choice((
                    INT64_MAX - small, INT64_MIN + small, NEVER + small, NEVER - small,
                    -NEVER + small, -NEVER - small, small, -small, INT64_MAX // 4 + small,
                    INT64_MIN // 2 - small))
            else:
                self.now_ns = rng.choice((HEADROOM[0] + small, HEADROOM[1] - small, small,
                                          -small, HEADROOM[1] // 2 + small))
            delta = 0
        else:
            self.now_ns = rng.randrange(0, 10**12)   # back to an ordinary uptime
            delta = 0
        low, high = (INT64_MIN, INT64_MAX) if self.times == "limits" else HEADROOM
        self.now_ns = min(high, max(low, self.now_ns + delta))
        r = rng.random()
        if r < 0.99 or (r < 0.997 and not wild):
            self.wall_ns += max(0, delta) if abs(delta) < 10**15 else 0
        elif r < 0.997:   # the wall clock steps (ACL expiry, timestamps)
            self.wall_ns += rng.choice((-1, 1)) * rng.choice((NS_PER_S, 3600 * NS_PER_S,
                                                             10**16))
        elif wild and self.wild_recv and r < 0.999:
            self.wall_ns = rng.choice((0, 1, -1, INT64_MAX - rng.randrange(1 << 40),
                                       INT64_MIN + rng.randrange(1 << 40), 1 << 62))
        else:
            self.wall_ns = WALL_BASE_NS + rng.randrange(10**12)
        self.wall_ns = min(INT64_MAX - 1000, max(INT64_MIN, self.wall_ns))
        return self.wall_ns + rng.randrange(1000), self.now_ns

    # -- sources
    def source(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.5:
            return rng.choice(V4_POOL) if rng.random() < 0.75 else rng.choice(V6_POOL)
        if r < 0.75 or not self.recent:
            self.serial += 1
            s = self.serial
            kind = rng.random()
            if kind < 0.45:    # a few /24s: prefixes are shared
                packed = bytes((10, 0, (s >> 4) & 0xFF, s & 0xF))
            elif kind < 0.7:
                packed = rng.randbytes(4)
            elif kind < 0.85:  # each its own /64, a handful of /56s
                packed = ipaddress.IPv6Address(
                    (0x2001_0db8_1000 << 80) | ((s % 1024) << 64) | rng.randrange(1 << 64)).packed
            else:
                packed = rng.randbytes(16)
            self.recent = (self.recent + [packed])[-48:]
            return packed
        return rng.choice(self.recent)

    def port_and_ttl(self, packed: bytes) -> tuple[int, int]:
        rng = self.rng
        home = self.home.get(packed)
        if home is None:
            home = (rng.choice((rng.randrange(1024, 65536), 123, 23457, 40_000)),
                    rng.choice((-1, 44, 57, 64, 118, 128, 250, 255, rng.randrange(256))),
                    rng.random() < 0.7)
            if len(self.home) < 4096:
                self.home[packed] = home
        stable = home[2]   # one client; else a crowd behind a NAT, or a spoofer
        r = rng.random()
        if r < (0.95 if stable else 0.4):
            port = home[0]
        elif r < 0.95:
            port = rng.randrange(65536)
        else:
            port = rng.choice((0, 123, 23457, 65535, 1, *REFLECTION))
        r = rng.random()
        if stable or r < 0.5:
            ttl = home[1]
        elif r < 0.75:
            ttl = min(255, max(-1, home[1] + rng.randint(-5, 5)))
        else:
            ttl = rng.randint(-1, 255)
        return port, ttl

    # -- datagrams
    def header(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.75:
            first = rng.choice(CLIENT_FIRSTS)
        else:   # every LI, version and mode
            first = (rng.randrange(4) << 6) | (rng.randrange(8) << 3) | rng.randrange(8)
        stratum = rng.choice((0, 0, 1, 2, 16, 255, rng.randrange(256)))
        poll = rng.choice((0, 4, 6, 10, 17, 0x7F, 0x80, 0xFA, 0xFF, rng.randrange(256)))
        middle = bytes(36) if rng.random() < 0.5 else rng.randbytes(36)
        return bytes((first, stratum, poll, rng.randrange(256))) + middle + rng.randbytes(8)

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and buf:
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
            elif op < 0.6 and buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif op < 0.75:
                del buf[rng.randrange(len(buf) + 1):]
            elif op < 0.9:
                buf += rng.randbytes(rng.choice((1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 68)))
            elif buf:
                buf[0] = rng.randrange(256)
        return bytes(buf)

    def mac_tail(self, body: bytes) -> bytes:
        rng = self.rng
        assert KEY is not None
        r = rng.random()
        if r < 0.3:
            return mac.sign(KEY, body, digest_len=rng.choice((20, 32)))   # valid, key 7
        if r < 0.4:
            return body + bytes(4)                                       # crypto-NAK
        key_id = rng.choice((7, 7, 0, 1, 0xFFFFFFFF, rng.randrange(1 << 32)))
        digest = rng.choice((16, 20, 32, 48, 64, 0, 1, 17, 21, 65))
        return body + key_id.to_bytes(4, "big") + rng.randbytes(digest)

    def extension(self, nts: bool) -> bytes:
        rng = self.rng
        kind = rng.choice(NTS_TYPES) if nts else rng.randrange(1 << 16)
        body = rng.randbytes(rng.choice((0, 4, 12, 16, 28, 32, 60, 100, 200)))
        length = 4 + len(body)
        r = rng.random()
        if r < 0.1:
            length = rng.choice((0, 1, 2, 3, 5, 15, 16, 17, 0xFFFF, length + 4))
        elif r < 0.15:
            body += bytes(rng.randrange(1, 4))   # unaligned
        return kind.to_bytes(2, "big") + length.to_bytes(2, "big") + body

    def datagram(self, packed: bytes) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            data = self.header()
        elif r < 0.55:
            data = self.mutate(self.last.get(packed) or self.header())
        elif r < 0.63:
            length = rng.randrange(0, 601) if rng.random() < 0.5 else \
                rng.choice((0, 1, 4, 44, 47, 48, 49, 52, 68, 72, 96, 112, 600))
            data = rng.randbytes(length)
        elif r < 0.71:
            data = self.mac_tail(self.header())
        elif r < 0.8:   # NTS-looking: a Unique Identifier first, then cookies, an authenticator
            header = bytearray(self.header())
            if rng.random() < 0.8:
                header[0] = (header[0] & 0xC0) | 0x23
            fields = [b"\x01\x04\x00\x24" + rng.randbytes(32)] if rng.random() < 0.8 else []
            fields += [self.extension(True) for _ in range(rng.randint(0, 3))]
            data = bytes(header) + b"".join(fields)
            if rng.random() < 0.2:
                data = self.mac_tail(data)
        elif r < 0.87:
            data = self.header() + b"".join(self.extension(False)
                                            for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.3:
                data = self.mac_tail(data)
        else:
            data = self.last.get(packed) or self.header()   # the same request again
        if rng.random() < 0.02:
            data = self.mutate(data)
        data = data[:2048]
        if len(self.last) < 4096 or packed in self.last:
            self.last[packed] = data
        return data

    def blocklist(self) -> list[AclEntry]:
        rng = self.rng
        entries = []
        for _ in range(rng.randint(0, 4)):
            packed = rng.choice(V4_POOL + V6_POOL + self.recent[-8:])
            bits = len(packed) * 8
            prefix = rng.choice((bits, bits, bits - 8, bits // 2, bits - 1))
            address = ipaddress.ip_address(packed)
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            expires = rng.choice((None, None, self.wall_ns - NS_PER_S,
                                  self.wall_ns + rng.randrange(1, 5 * NS_PER_S),
                                  self.wall_ns + 3600 * NS_PER_S))
            if expires is not None:
                expires = min(INT64_MAX, max(INT64_MIN, expires))
            entries.append(AclEntry(network, rng.choice((Action.DROP, Action.DROP, Action.DENY,
                                                         Action.EXEMPT)),
                                    rng.choice(("manual", "auto", "import")), "fuzz", expires))
        return entries


def reloaded(rng: random.Random, policy: FilterPolicy) -> FilterPolicy:
    """``policy`` with one to three settings changed (a reload)."""
    choices: dict[str, Callable[[], object]] = {
        "source_rate": lambda: rng.choice((0.125, 1.0, 2.0, 50.0, 1e6)),
        "source_burst": lambda: rng.choice((1, 2, 3, 8, 100)),
        "prefix_rate": lambda: rng.choice((1.0, 6.0, 16.0, 1e5)),
        "prefix_burst": lambda: rng.choice((1, 4, 8, 2048)),
        "max_sources": lambda: rng.choice((1, 2, 6, 20, 262_144)),
        "max_prefixes": lambda: rng.choice((1, 3, 12, 65_536)),
        "max_newcomers": lambda: rng.choice((1, 4, 9, 524_288)),
        "leak_one_in": lambda: rng.choice((0, 1, 2, 4, 1 << 62)),
        "send_kod": lambda: rng.random() < 0.7,
        "kod_interval_s": lambda: rng.choice((0.0, 1.0, 16.0, 86_400.0)),
        "kod_rate": lambda: rng.choice((0.5, 3.0, 1000.0)),
        "kod_burst": lambda: rng.choice((1, 2, 1000)),
        "kod_min_poll": lambda: rng.choice((-128, 0, 6, 17, 127)),
        "global_reply_rate": lambda: rng.choice((0.0, 5.0, 25.0, 1e6)),
        "global_reply_burst": lambda: rng.choice((1, 5, 25_000)),
        "max_crowd": lambda: rng.choice((1, 2, 4, 256, 1 << 16)),
        "ttl_classes": lambda: rng.random() < 0.5,
        "answer_symmetric": lambda: rng.random() < 0.7,
        "ipv4_prefix": lambda: rng.choice((8, 20, 24, 31, 32)),
        "ipv6_prefix": lambda: rng.choice((32, 48, 56, 60, 64, 128)),
        "ipv6_source_prefix": lambda: rng.choice((48, 56, 60, 64, 128)),   # 60: refused
        "reflection_ports": lambda: rng.choice((
            DEFAULT_REFLECTION_PORTS, frozenset(), DEFAULT_REFLECTION_PORTS | {123, 40_000},
            frozenset({23457, 65535}))),
        "acl": lambda: rng.choice(((), ACL, ACL[:3], ACL[3:])),
        "deny_action": lambda: rng.choice((Action.DROP, Action.DENY)),
        "label_policies": lambda: rng.choice((
            dict(policy.label_policies),
            {"sntpv1": LabelPolicy(1.0, 1, send_kod=False)},
            {"ntpv4": LabelPolicy(0.5, 2), "netgear-sntpv1-23457": LabelPolicy(1 / 64, 2)})),
    }
    names = sorted(choices)
    changes = {name: choices[name]() for name in rng.sample(names, rng.randint(1, 3))}
    return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- one episode


@dataclasses.dataclass
class Stats:
    steps: int = 0
    episodes: Counter[str] = dataclasses.field(default_factory=Counter)
    in_c: int = 0
    c_reasons: Counter[str] = dataclasses.field(default_factory=Counter)
    fast_decisions: int = 0
    first_sightings: int = 0
    promotions: int = 0
    reloads: int = 0
    refused_reloads: int = 0
    blocklists: int = 0
    clock_changes: int = 0
    extremes: int = 0
    full_checks: int = 0


def make_pair(name: str, seed: int, settings: dict[str, Any]
              ) -> tuple[Pipeline, Pipeline, fastlane.FastLane, socket.socket]:
    settings = dict(settings)
    auth = settings.pop("_auth", None)
    nts = settings.pop("_nts", False)
    policy = FilterPolicy(random_seed=seed, **settings)
    reference = Pipeline(policy, Responder(CLOCK, WALL_BASE_NS), authenticator(auth))
    reference.newcomers.ring = PyNewcomerRing(policy.max_newcomers)
    python_tables(reference)
    compiled = Pipeline(policy, Responder(CLOCK, WALL_BASE_NS), authenticator(auth))
    if nts:
        reference.nts = FakeNts()
        compiled.nts = FakeNts()
    # The Lane only keeps the descriptor; decide_one never touches the socket.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return reference, compiled, fastlane.FastLane(sock, compiled), sock


def inject(kind: str, step: int, episode: int) -> str | None:
    """The self-test's fault for this step, if any (GUARDNTP_FUZZ_INJECT=kind:step)."""
    spec = os.environ.get("GUARDNTP_FUZZ_INJECT", "")
    if not spec or episode != 0:
        return None
    what, _, at = spec.partition(":")
    return what if step == int(at or 500) and what == kind else None


def sanitizer_fault(kind: str) -> None:
    """Make the loaded sanitizer report something (self-test only)."""
    libc = ctypes.CDLL(None)
    if kind == "asan":
        try:
            libc.__asan_init   # noqa: B018 (is the ASan runtime in this process?)
        except AttributeError:
            raise Failure("GUARDNTP_FUZZ_INJECT=asan needs ASan loaded (LD_PRELOAD)") from None
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        block = libc.malloc(64)
        libc.free(block)
        libc.memset(block, 0, 8)   # heap-use-after-free
    else:
        helper = os.environ.get("GUARDNTP_FUZZ_UBSAN_HELPER")
        if not helper:
            raise Failure("GUARDNTP_FUZZ_INJECT=ubsan needs GUARDNTP_FUZZ_UBSAN_HELPER")
        lib = ctypes.CDLL(helper)
        lib.guardntp_fuzz_overflow(ctypes.c_int(2**31 - 1))   # signed overflow
    raise Failure(f"injected {kind} fault: the sanitizer did not stop the process")


def run_episode(seed: int, episode: int, max_steps: int, deadline: float, check_every: int,
                full_from: int, stats: Stats, times: str, wild_recv: bool,
                crumb: Callable[[int, int, str], None] | None, only: list[str]) -> int:
    """Run one episode; returns the number of steps taken. Raises Failure."""
    name = only[episode % len(only)]
    rng = random.Random(f"guardntp-fuzz:{seed}:{episode}")
    length = rng.randrange(500, 5000)
    reference, compiled, lane, sock = make_pair(name, rng.randrange(1 << 64), POLICIES[name])
    traffic = Traffic(rng, times, wild_recv)
    stats.episodes[name] += 1
    step = 0
    where = ""
    try:
        for step in range(min(length, max_steps)):
            if step % 64 == 0 and time.monotonic() >= deadline:
                break
            if crumb is not None:
                crumb(episode, step, name)
            recv_ns, now_ns = traffic.tick()
            packed = traffic.source()
            port, ttl = traffic.port_and_ttl(packed)
            data = traffic.datagram(packed)
            where = (f"policy {name}: {data[:1].hex() or '-'} len {len(data)} from "
                     f"{ipaddress.ip_address(packed)} port {port} ttl {ttl} "
                     f"recv_ns {recv_ns} now_ns {now_ns}")
            v4 = len(packed) == 4
            key = packed if v4 else packed[: reference.compiled.v6_source_bytes]
            new = key not in reference.sources.records
            before = (lane.first_sightings, lane.fast_decisions)
            try:
                expected = reference.decide(data, packed, port, recv_ns, now_ns, ttl)
            except Exception as error:
                raise Failure(f"Pipeline.decide raised {error!r}: {where}",
                              traceback.format_exc(chain=False)) from error
            try:
                reason, reply, signer, in_c = lane.decide_one(data, packed, port, recv_ns,
                                                              now_ns, ttl)
            except Exception as error:
                raise Failure(f"decide_one raised {error!r} where Pipeline.decide gave "
                              f"{expected[:2]!r}: {where}",
                              traceback.format_exc(chain=False)) from error
            if inject("mismatch", step, episode):
                expected = (expected[0], (expected[1] or b"") + b"!", expected[2])
            if not in_c:
                raise Failure(f"handed to Pipeline.decide, not decided in C "
                              f"({Reason(reason).name}): {where}")
            if (reason, reply) != tuple(expected[:2]):
                raise Failure(f"decision: python {Reason(expected[0]).name} {expected[1]!r} != "
                              f"compiled {Reason(reason).name} {reply!r}: "
                              f"{where}")
            if (signer is None) != (expected[2] is None):
                raise Failure(f"signer: python {expected[2]!r}, compiled {signer!r}: {where}")
            if signer is not None and reply is not None and \
                    signer(reply) != expected[2](reply):   # type: ignore[misc]
                raise Failure(f"the signers sign differently: {where}")
            if lane.first_sightings > before[0] and not (new and in_c):
                raise Failure(f"a first sighting counted for a known source: {where}")
            if lane.fast_decisions > before[1] and not (
                    in_c and reason in (Reason.ANSWERED, Reason.LEAKED)):
                raise Failure(f"a fast decision counted for {Reason(reason).name}: {where}")
            if inject("state", step, episode):
                reference.counters.counts[0] += 1
            for kind in ("asan", "ubsan"):
                if inject(kind, step, episode):
                    sanitizer_fault(kind)
            stats.in_c += 1
            stats.c_reasons[Reason(reason).name] += 1
            prefix_key = prefix_key_of(packed, reference.compiled.v4_prefix_bits,
                                       reference.compiled.v6_prefix_bits)
            if step >= full_from or step % check_every == 0:
                stats.full_checks += 1
                want, got = reference.snapshot(), compiled.snapshot()
            else:
                want = quick_state(reference, key, prefix_key)
                got = quick_state(compiled, key, prefix_key)
            if want != got:
                raise Failure(f"state after the step: {differences(want, got)}: {where}")
            # -- now and then: a reload, a blocklist change, a clock change (on both)
            r = rng.random()
            if r < 0.0025:
                policy = reloaded(rng, reference.policy)
                try:
                    reference.apply_policy(policy)
                except BadPolicy as error:
                    stats.refused_reloads += 1
                    try:
                        compiled.apply_policy(policy)
                    except BadPolicy:
                        continue
                    raise Failure(f"a reload refused by one pipeline only ({error})") from None
                compiled.apply_policy(policy)
                python_ring(reference)
                stats.reloads += 1
            elif r < 0.005:
                entries = traffic.blocklist()
                reference.set_blocklist(entries)
                compiled.set_blocklist(entries)
                stats.blocklists += 1
            elif r < 0.006:
                clock = dataclasses.replace(
                    CLOCK, synchronized=rng.random() < 0.9, stratum=rng.choice((1, 2, 15, 16)),
                    offset_ns=rng.choice((0, -1_234_567, 7_000_000_123, -(10**15))),
                    leap=rng.choice(list(Leap)))
                for pipeline in (reference, compiled):
                    pipeline.responder.set_clock(clock, recv_ns)
                stats.clock_changes += 1
        else:
            step += 1   # (the loop ran to its end)
        want, got = reference.snapshot(), compiled.snapshot()
        if want != got:
            raise Failure(f"state at the episode's end: {differences(want, got)}")
    except Failure as failure:
        failure.args = (failure.args[0], name, step, *failure.args[1:2])
        raise
    except Exception as error:   # a reload, a blocklist or a clock change that failed
        raise Failure(f"{error!r} (after: {where})", name, step,
                      traceback.format_exc(chain=False)) from error
    finally:
        stats.steps += step
        stats.fast_decisions += lane.fast_decisions
        stats.first_sightings += lane.first_sightings
        stats.promotions += lane.promotions
        stats.extremes += traffic.extremes
        sock.close()
    return step


def breadcrumb_writer(path: str, seed: int) -> Callable[[int, int, str], None]:
    """Where the run is, rewritten in place at each step: what a sanitizer abort leaves."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(episode: int, step: int, name: str) -> None:
        os.pwrite(fd, f"{seed} {episode} {step} {name}\n".ljust(80).encode(), 0)

    return write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="stop after this long (default 60; 0: no time limit)")
    parser.add_argument("--steps", type=int, default=0,
                        help="stop after this many datagrams in all (0: no limit); with "
                             "--episode, the steps of that episode to run")
    parser.add_argument("--seed", type=int, default=None,
                        help="the run's seed (default: a random one, printed)")
    parser.add_argument("--episode", type=int, default=None,
                        help="run only this episode of the seed (to reproduce)")
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES),
                        help="only these base policies (repeatable; the episode numbering "
                             "then cycles over them)")
    parser.add_argument("--check-every", type=int, default=50,
                        help="compare the whole state every N steps (default 50; 1: every "
                             "step); the touched records are compared at every step")
    parser.add_argument("--times", choices=TIMES, default="limits",
                        help="where now_ns may go: right up to the int64 limits (default), "
                             "-2**61..2**62 with jumps to both ends (headroom), or only "
                             "ordinary jumps (ordinary)")
    parser.add_argument("--no-wild-recv", action="store_true",
                        help="keep recv_ns (the wall clock) within years of 2027")
    parser.add_argument("--no-narrow", action="store_true",
                        help="on a state mismatch, do not re-run the episode to find its "
                             "first divergent step")
    parser.add_argument("--breadcrumb", help="keep 'seed episode step policy' in this file")
    parser.add_argument("--expect-extension",
                        help="fail unless guardntp._fastlane was loaded from this file")
    args = parser.parse_args(argv)
    if args.check_every < 1 or args.seconds < 0 or args.steps < 0:
        parser.error("--check-every must be >= 1, --seconds and --steps >= 0")

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    if "PYTHONHASHSEED" not in os.environ:
        # String hashes steer CPython's own caches, and through them what an error path
        # in the extension does: pin them to the seed, so the seed says everything.
        os.environ["PYTHONHASHSEED"] = str(seed % (1 << 32))
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__),
                                  *(argv if argv is not None else sys.argv[1:]),
                                  "--seed", str(seed)])
    if not fastlane.available():
        print(f"fuzz_fastlane: the compiled loop is unavailable: "
              f"{fastlane.unavailable_because()}", file=sys.stderr)
        return 1
    loaded = os.path.realpath(fastlane._fastlane.__file__ or "")
    print(f"fuzz_fastlane: guardntp._fastlane from {loaded}", flush=True)
    if args.expect_extension and loaded != os.path.realpath(args.expect_extension):
        print(f"fuzz_fastlane: expected {args.expect_extension}", file=sys.stderr)
        return 1
    only = args.policy or list(POLICIES)
    times, wild_recv = args.times, not args.no_wild_recv
    flags = "".join((f" --times {times}" if times != "limits" else "",
                     " --no-wild-recv" if not wild_recv else "",
                     "".join(f" --policy {name}" for name in args.policy or ())))
    crumb = breadcrumb_writer(args.breadcrumb, seed) if args.breadcrumb else None
    stats = Stats()
    start = time.monotonic()
    deadline = start + args.seconds if args.seconds > 0 else float("inf")
    if args.episode is not None and args.seconds == parser.get_default("seconds"):
        deadline = float("inf")   # reproducing: run the episode to its step
    bound = (f"episode {args.episode}, {args.steps or 'all'} steps" if args.episode is not None
             else f"{args.seconds:g} s / {args.steps or 'unbounded'} steps")
    print(f"fuzz_fastlane: seed {seed} (PYTHONHASHSEED {os.environ['PYTHONHASHSEED']}), "
          f"policies {', '.join(only)}; {bound}{flags}", flush=True)
    episode = args.episode if args.episode is not None else 0
    next_report = start + 15
    try:
        while time.monotonic() < deadline:
            left = args.steps - stats.steps if args.steps else 1 << 62
            if left <= 0:
                break
            run_episode(seed, episode, left, deadline, args.check_every,
                        1 << 62, stats, times, wild_recv, crumb, only)
            if args.episode is not None:
                break
            episode += 1
            if time.monotonic() >= next_report:
                next_report += 15
                print(f"fuzz_fastlane: ... {stats.steps} steps, {episode} episodes, "
                      f"{stats.steps / (time.monotonic() - start):.0f}/s", flush=True)
    except Failure as failure:
        message, name, first, *trace = failure.args
        if not args.no_narrow and args.check_every > 1:
            # Where did the states first differ? Replay the episode comparing everything.
            try:
                run_episode(seed, episode, first + 1, float("inf"), 1, 0, Stats(),
                            times, wild_recv, None, only)
            except Failure as narrowed:
                message, name, first, *trace = narrowed.args
        if trace:
            print(trace[0], file=sys.stderr, end="")
        print(f"fuzz_fastlane: MISMATCH at seed {seed} episode {episode} ({name}) step {first}:"
              f" {message}", file=sys.stderr)
        hashed = os.environ["PYTHONHASHSEED"]
        pin = "" if hashed == str(seed % (1 << 32)) else f"PYTHONHASHSEED={hashed} "
        print(f"REPRODUCE: {pin}{sys.executable} tools/fuzz_fastlane.py --seed {seed} --episode "
              f"{episode} --steps {first + 1} --check-every 1{flags}", file=sys.stderr,
              flush=True)
        return 1
    elapsed = time.monotonic() - start
    print(f"fuzz_fastlane: OK: {stats.steps} datagrams in {elapsed:.1f} s "
          f"({stats.steps / max(elapsed, 1e-9):.0f}/s), {sum(stats.episodes.values())} episodes "
          f"({', '.join(f'{k} {v}' for k, v in sorted(stats.episodes.items()))})")
    print(f"fuzz_fastlane: decided in C {stats.in_c} (all); C time replies (fast_decisions) "
          f"{stats.fast_decisions}, first sightings in C {stats.first_sightings}, promotions "
          f"{stats.promotions}")
    print(f"fuzz_fastlane: in C: {dict(stats.c_reasons.most_common())}")
    print(f"fuzz_fastlane: reloads {stats.reloads} (+{stats.refused_reloads} refused by both), "
          f"blocklist changes {stats.blocklists}, clock changes {stats.clock_changes}, "
          f"extreme now_ns jumps {stats.extremes}, whole-state comparisons {stats.full_checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
