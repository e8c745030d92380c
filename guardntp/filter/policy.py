"""The filter's settings, each default with the reason for its number.

Rule: this is plain data. ``guardntp/config.py`` fills it from TOML and CLI
flags, checking each value against the ranges a person may sensibly set;
``pipeline.compile_policy`` turns it into GCRA limits once, at (re)load, and
refuses (:class:`BadPolicy`) what the filter cannot run, whoever built it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import fingerprint
from .acl import AclEntry, Action

#: Source ports of services used in loop and reflection attacks (protocol-rules.md):
#: 0 (invalid), echo 7, discard 9, daytime 13, qotd 17, chargen 19, time 37, DNS 53,
#: TFTP 69, portmap 111, NetBIOS 137-138, SNMP 161-162, CLDAP 389, SSDP 1900,
#: WS-Discovery 3702, mDNS 5353, memcached 11211. Port 123 is NOT here: ntpd and
#: NTPsec clients send from it.
DEFAULT_REFLECTION_PORTS = frozenset(
    {0, 7, 9, 13, 17, 19, 37, 53, 69, 111, 137, 138, 161, 162, 389, 1900, 3702, 5353, 11211})

#: The longest per-source KoD guard time. A day is past any use (a client that was
#: kissed once has long since backed off), and it keeps the guard a small integer.
MAX_KOD_INTERVAL_S = 86_400.0


class BadPolicy(ValueError):
    """A :class:`FilterPolicy` the filter cannot run; ``key`` names the setting as
    under ``[filter]`` (``source_rate``, ``labels.sntpv1.burst``, ``acl[2]``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class LabelPolicy:
    """A per-fingerprint override of the per-source bucket and of KoD sending."""

    rate: float
    burst: int
    send_kod: bool = True


#: Defaults per fingerprint. SNTPv1 firmware gets a tight bucket: Netgear's devices
#: retried every second *when unanswered*, so they still get an answer a minute
#: rather than none (Plonka's report), which calms them. They get RATE KoDs too,
#: as every flooder does (one per source per ``kod_interval_s``, within the global
#: KoD budget, in the request's own version): SNTPv1 predates KoD (RFC 4330, 2006)
#: and old firmware may well ignore it, but a KoD is never larger than the request,
#: and a client that does honour it backs off. ``send_kod = false`` per label
#: turns it off.
DEFAULT_LABEL_POLICIES: dict[str, LabelPolicy] = {
    fingerprint.NETGEAR: LabelPolicy(rate=1 / 64, burst=2),
    fingerprint.SNTPV1: LabelPolicy(rate=1 / 16, burst=4),
}


@dataclass(frozen=True)
class FilterPolicy:
    # -- sanity
    #: Answer mode 1 (w32time, old WinXP SNTP) with a stateless mode 2, as chrony does.
    answer_symmetric: bool = True

    # -- anti-reflection
    reflection_ports: frozenset[int] = DEFAULT_REFLECTION_PORTS

    # -- per-source bucket (IPv4 address, IPv6 /64)
    #: One client's allowance is chrony's default `ratelimit` (1 per 8 s, burst 8):
    #: an iburst of 8 and any sane poll fit, and a host at 2/s is cut to 1/8 s. A
    #: NAT'd crowd is not one client: the bucket refills `crowd` times faster, with
    #: the crowd estimated from the address's source ports and arrival pattern
    #: (``crowd.py``), up to `max_crowd`.
    source_rate: float = 0.125
    source_burst: int = 8
    #: The most clients one address may count as: 256 x 1/8 s = 32 requests/s, what
    #: a flooder who imitates a crowd can get at most (and then only inside its
    #: prefix's bucket). 800 chrony clients at 64 s polls behind one NAT address send
    #: 12.5/s, which needs a crowd of 100. 1 turns the estimate off.
    max_crowd: int = 256
    #: Charge requests from another TTL / hop limit than the source's usual one to a
    #: bucket of their own (``crowd.py``): a spoofer flooding in a victim's name
    #: drains its own bucket, not the victim's.
    ttl_classes: bool = True
    #: Each IPv6 host owns a /64 (RFC 4291 interface ids), so buckets key on it.
    ipv6_source_prefix: int = 64

    # -- per-prefix bucket (IPv4 /24, IPv6 /56)
    #: 16 requests/s, burst 2048: 250 hosts in one /24 all starting with an 8-packet
    #: iburst fit in the burst, and a busy campus of 1000 hosts polling every 64 s
    #: (16/s) is never limited; a fleet of 254 devices each polling every second is
    #: held to 16/s in all.
    prefix_rate: float = 16.0
    prefix_burst: int = 2048
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56

    # -- global budget
    #: Replies of any kind per second, server-wide; 0 turns it off. 1M/s is above what
    #: a few cores answer (~300k/s each with the compiled loop, docs/benchmarks.md),
    #: i.e. a safety net for the uplink (1M x 90 B x 8 = 720 Mbit/s); set it to what
    #: your uplink may carry.
    global_reply_rate: float = 1_000_000.0
    global_reply_burst: int = 25_000

    # -- over the limit
    #: Answer 1 in `leak_one_in` limited requests anyway (chrony's `leak 2` = 1 in 4).
    #: Off by default: the leak hands every flooder a quarter of its rate, and the
    #: TTL classes above protect a spoofed victim without it. 0 = off.
    leak_one_in: int = 0
    send_kod: bool = True
    #: At most one KoD per source per this many seconds (ntpd's guard-time idea):
    #: a spoofer can never make us send a victim more than this.
    kod_interval_s: float = 16.0
    #: Server-wide KoD budget: a flood from a million spoofed sources gets at most this.
    kod_rate: float = 1000.0
    kod_burst: int = 1000
    #: The KoD's poll field is max(request poll, kod_min_poll): 6 = 64 s, the
    #: default poll of ntpd and chrony, to which an honouring client returns.
    kod_min_poll: int = 6
    #: What a `deny` access-list entry does by default: silent "drop" or DENY "kod".
    deny_action: Action = Action.DROP

    # -- bounded memory
    #: 380-630 bytes each in CPython 3.11 with the compiled records and index, 470-715
    #: without (contrib/sizing/measure.py), ~110 MiB when full. chrony's default
    #: clientloglimit (512 KiB) tracks only ~4096 addresses.
    max_sources: int = 262_144
    max_prefixes: int = 65_536
    #: First sightings (TAT only, ~90 B each in the compiled ring: ~45 MiB). A source
    #: becomes established at its second request if this ring outlives its polling
    #: interval: 524,288
    #: entries last 2.6 s at 200,000 new spoofed sources a second, more than one
    #: core can receive, so a device polling every second is always promoted.
    max_newcomers: int = 524_288

    label_policies: dict[str, LabelPolicy] = field(
        default_factory=lambda: dict(DEFAULT_LABEL_POLICIES))
    acl: tuple[AclEntry, ...] = ()
    #: Seed for the leak's random choice (replays are deterministic with a seed).
    random_seed: int | None = None
