"""Named, seeded, scalable traffic models: the documented floods and normal clients.

Rule: pure. A scenario turns (seed, scale, duration) into a time-ordered stream of
:data:`Event` tuples; no bytes are built and nothing is written here (``capture``
does that). Figures come from ``shared/docs/incidents.md``; where a report gives
no number (a device's poll interval, say) the value chosen is marked *assumed*.

Scale multiplies the number of clients (or, for the streams of one-off spoofed
packets, the packet rate); ``scale = 1`` is the size in :data:`SCALE_ONE` below.
Every scenario owns its address block, so a mix never puts two scenarios behind
one source address, and every block is a documentation, private or shared
(RFC 6598) range. With one deliberate exception: ``spoofed-victim`` (legitimate
chrony clients) and ``victim-spoofer`` (a flood forged in those clients' names)
share :data:`VICTIMS_NETWORK` and the very same victim addresses, because a mix
of the two is the point: the flood must not cut its victims off. Their shared
addresses come from a generator seeded by (seed, "victims") (see
:class:`ScenarioRandom`); everything else each scenario draws from its own.

Every packet arrives with an IP TTL (IPv4) or hop limit (IPv6): the sender's
initial value (64 for Linux, the BSDs and most embedded stacks, 128 for Windows,
255 for lwIP firmware) less the hops of its path, 3-20 (*assumed*), fixed per
source by a hash of its address (:func:`_path_ttl`) so that it draws nothing from
the scenario's generator; spoofers send one constant TTL each.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..timestamps import NS_PER_S

#: (offset from capture start in ns, scenario tag, client id, Kind, packed source, source port,
#: the IP TTL (IPv4) / hop limit (IPv6) the packet arrives with)
Event = tuple[int, int, int, int, bytes, int, int]

LEGITIMATE = "legitimate"
ABUSIVE = "abusive"
CLASSES = (LEGITIMATE, ABUSIVE)

#: 2024-03-01 11:59:00 UTC: every capture starts one minute before the top of an hour.
CAPTURE_EPOCH_NS = 1_709_294_340 * NS_PER_S
TOP_OF_HOUR_OFFSET_S = 60
SERVER_V4 = "127.0.0.1"
SERVER_V6 = "::1"
SERVER_PORT = 123
NTPD_PORT = 123


class Kind(enum.IntEnum):
    """What a packet looks like; ``capture`` builds one template frame per kind and family."""

    NTPV4 = 0           # chrony / ntpd / SNTPv4 client request, mode 3
    SNTPV1 = 1          # SNTP version 1 request (Netgear, D-Link, SMC firmware)
    W32TIME = 2         # Windows w32time: version 3, mode 1 (symmetric active)
    MODE6_READVAR = 3   # ntpq-style control query (12 bytes)
    MODE7_MONLIST = 4   # ntpdc MON_GETLIST_1, the monlist amplification probe (48 bytes)
    NTPV4_FAST = 5      # chronyd with minpoll -2: NTPv4 mode 3, poll field -2 (0xFE)


def _header(first: int, poll: int = 0, precision: int = 0, stratum: int = 0) -> bytes:
    return bytes((first, stratum, poll & 0xFF, precision & 0xFF)) + bytes(44)


#: NTP payloads; the transmit timestamp (bytes 40-47) is patched per packet for kinds
#: in :data:`XMT_PATCHED`. Byte 0 is LI | VN << 3 | mode.
KIND_PAYLOADS: dict[Kind, bytes] = {
    Kind.NTPV4: _header(0x23, poll=6, precision=-20),           # LI 0, VN 4, mode 3
    Kind.SNTPV1: _header(0x0B),                                  # LI 0, VN 1, mode 3
    # LI 3 (unsynchronised), VN 3, mode 1; poll and precision are illustrative.
    Kind.W32TIME: _header(0xD9, poll=10, precision=-6),
    # VN 2, mode 6, opcode 2 (READVAR), sequence 1, no data.
    Kind.MODE6_READVAR: bytes((0x16, 0x02, 0x00, 0x01)) + bytes(8),
    # VN 2, mode 7, implementation 3 (XNTPD), request 42 (MON_GETLIST_1), ntpdc's 48 bytes.
    Kind.MODE7_MONLIST: bytes((0x17, 0x00, 0x03, 0x2A)) + bytes(44),
    Kind.NTPV4_FAST: _header(0x23, poll=-2, precision=-20),     # chronyd, minpoll -2
}
XMT_PATCHED = frozenset({Kind.NTPV4, Kind.SNTPV1, Kind.W32TIME, Kind.NTPV4_FAST})

#: How big each scenario is at scale 1, with where the number comes from.
SCALE_ONE: dict[str, str] = {
    "netgear-2003": "500 devices x 1 request/s (1/500 of Wisconsin's 250,000 packets/s)",
    "dlink-2005": "2,083 devices x 1 request/60 s = 3 million requests/day (DIX); "
                  "60 s per device assumed",
    "smc-2003": "1,000 devices retrying every 30 s",
    "mobatime-2009": "75 hosts x 1.85 requests/s = 12 million requests/day",
    "spoofed-random": "500 packets/s, each from a new random source in 10.128.0.0/9",
    "reflection-probes": "50 probes/s from 508 victim addresses",
    "top-of-hour": "1,000 homes x 1-6 IoT devices at minute 0, 300 cron'd ntpdate hosts",
    "chrony": "2,000 chrony/ntpd clients",
    "w32time": "2,000 Windows hosts polling every 1-6 h",
    "cgnat": "4 carrier-grade NAT addresses x 200 clients",
    "ipv6-hosts": "1,000 IPv6 hosts, each its own /64",
    "cgnat-800": "1 carrier-grade NAT address x 800 chrony/ntpd clients at 64 s polls = "
                 "12.5 requests/s, a fresh NAT port per request (800 clients assumed)",
    "fast-poller": "5 chronyd hosts with minpoll -2, a request every 0.25 s from one port "
                   "(host count assumed)",
    "fast-poller-random-ports": "5 chronyd hosts with minpoll -2, a request every 0.25 s, "
                                "each from a new port (host count assumed)",
    "spoofed-victim": "4 victims, each a chrony client at 64 s polls arriving with TTL 57 "
                      "(victim count assumed, kept small by victim-spoofer's packet count)",
    "victim-spoofer": "50 forged requests/s in each of spoofed-victim's 4 victims' names, "
                      "arriving with TTL 44 (rate and TTL assumed)",
    "ripe-atlas": "1,000 RIPE-Atlas-style probes, 3 requests back to back every 240 s "
                  "(interval and probe count assumed)",
    "deny-loop": "1 ntpd-rs client re-sending at once on every DENY / KoD / failure: "
                 "100 requests/s, a 10 ms round trip (rate and count assumed)",
}


class ScenarioRandom(random.Random):
    """A scenario's own generator, seeded by (seed, scenario name) exactly as a plain
    ``random.Random(f"{seed}/{name}")``, that also knows the capture's seed: scenarios meant
    to share values (spoofed-victim and victim-spoofer's victims) each derive the same
    from :meth:`shared` and draw everything else from themselves."""

    def __init__(self, seed: int, name: str) -> None:
        super().__init__(f"{seed}/{name}")
        self.capture_seed = seed

    def shared(self, key: str) -> random.Random:
        """A new generator seeded by (seed, ``key``): the same in every scenario asking."""
        return random.Random(f"{self.capture_seed}/{key}")


@dataclass(frozen=True)
class Scenario:
    name: str
    klass: str
    summary: str
    networks: tuple[str, ...]
    events: Callable[[ScenarioRandom, float, int, int], Iterator[Event]]
    """(rng, scale, duration_ns, tag) -> time-ordered events"""


# ---------------------------------------------------------------------- building blocks

def _count(base: float, scale: float) -> int:
    return max(1, round(base * scale))


class _AddressPool:
    """Distinct random host addresses from one network (never its .0 or .255 hosts)."""

    def __init__(self, rng: random.Random, cidr: str) -> None:
        network = ipaddress.ip_network(cidr)
        self.rng = rng
        self.base = int(network.network_address)
        self.size = network.num_addresses
        self.width = network.max_prefixlen // 8
        self.used: set[int] = set()

    def draw(self) -> bytes:
        while True:
            offset = self.rng.randrange(1, self.size - 1)
            if self.width == 4 and (offset & 0xFF) in (0, 255):
                continue
            if offset not in self.used:
                self.used.add(offset)
                return (self.base + offset).to_bytes(self.width, "big")


def _ephemeral_port(rng: random.Random) -> int:
    # Linux's default ip_local_port_range: never a reflection (service) port.
    return rng.randrange(32768, 61000)


#: Initial TTLs / hop limits: Linux, the BSDs, macOS and most embedded stacks send 64,
#: Windows 128, lwIP (ESP8266 / ESP32 firmware such as Tasmota) 255.
TTL_UNIX = 64
TTL_WINDOWS = 128
TTL_LWIP = 255


def _path_ttl(initial: int, path: bytes) -> int:
    """``initial`` less the hops (3-20, *assumed*) from ``path`` (an address, or the prefix
    a site shares) to the server. Fixed by a hash of ``path``, not drawn from the
    scenario's generator, so the scenario's other fields do not depend on it and a
    source keeps one TTL for the whole capture."""
    return initial - 3 - zlib.crc32(path) % 18


def _nat_ttl(address: bytes, client: int) -> int:
    """A Linux client behind the NAT ``address``: the address's path, plus the NAT itself
    (one hop) or, for one client in five (*assumed*: a second router or a mesh), two."""
    inner = 2 if zlib.crc32(address + client.to_bytes(4, "big")) % 5 == 0 else 1
    return _path_ttl(TTL_UNIX, address) - inner


def _nat_port(rng: random.Random) -> int:
    # A carrier-grade NAT maps to any port of 1024-65535 (RFC 6888).
    return rng.randrange(1024, 65536)


def _fresh_ports(rng: random.Random, events: Iterator[Event],
                 ports: Callable[[random.Random], int] = _ephemeral_port) -> Iterator[Event]:
    """``events``, each from a new random port (a client that opens a new socket per
    request, or with ``ports=_nat_port`` a NAT that maps each request anew)."""
    for t_ns, tag, client, kind, src, _, ttl in events:
        yield (t_ns, tag, client, kind, src, ports(rng), ttl)


def _merge(streams: Iterable[Iterator[Event]]) -> Iterator[Event]:
    """Merge per-client streams (each in time order) into one time-ordered stream."""
    heap: list[tuple[Event, int, Iterator[Event]]] = []
    for index, stream in enumerate(streams):
        first = next(stream, None)
        if first is not None:
            heap.append((first, index, stream))
    heapq.heapify(heap)
    while heap:
        event, index, stream = heap[0]
        yield event
        following = next(stream, None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (following, index, stream))


def _periodic(rng: random.Random, first_ns: int, period_ns: int, jitter: float, end_ns: int,
              tag: int, client: int, kind: Kind, src: bytes, port: int, ttl: int
              ) -> Iterator[Event]:
    """A device that sends every ``period_ns`` (+- ``jitter`` of it) whatever it gets back."""
    spread = period_ns * jitter
    t = first_ns
    while t < end_ns:
        yield (t, tag, client, kind, src, port, ttl)
        t += period_ns + int((rng.random() * 2 - 1) * spread)


#: chrony/ntpd start at minpoll 6 (64 s) and, on a stable path, double the interval up
#: to maxpoll 10 (1024 s); a client is assumed to double after this many polls.
MIN_POLL = 6
MAX_POLL = 10
POLLS_PER_STEP = 4
#: Share of clients on a noisy path, assumed to settle at 256 s instead of 1024 s.
NOISY_SHARE = 0.1
NOISY_MAX_POLL = 8
#: How often a client (re)starts (reboot, resume, new network): assumed once a day,
#: at random (a Poisson process), each start beginning with an iburst.
STARTS_PER_DAY = 1.0
#: Share of clients that are ntpd (source port 123, iburst of 8) rather than chrony
#: (one ephemeral port per server, iburst of 4); both send their iburst 2 s apart.
NTPD_SHARE = 0.3


def _ntp_client(rng: random.Random, duration_ns: int, tag: int, client: int, src: bytes,
                ttl: int, port: int | None = None, max_poll: int | None = None
                ) -> Iterator[Event]:
    """One chrony or ntpd client: iburst at each start, 64 s polls doubling to its maxpoll
    (drawn, unless given: ``max_poll = MIN_POLL`` holds it at 64 s).

    The capture opens in the middle of the client's life: the start it is in began
    an exponentially distributed time ago (memoryless restarts), so most clients are
    found at maxpoll and a few in their iburst or ramp, as on a real server.
    """
    is_ntpd = rng.random() < NTPD_SHARE
    if port is None:
        port = NTPD_PORT if is_ntpd else _ephemeral_port(rng)
    if max_poll is None:
        max_poll = NOISY_MAX_POLL if rng.random() < NOISY_SHARE else MAX_POLL
    start_rate = STARTS_PER_DAY / 86_400
    duration_s = duration_ns / NS_PER_S
    times: list[float] = []
    start = -rng.expovariate(start_rate)
    while start < duration_s:
        end = min(start + rng.expovariate(start_rate), duration_s)
        burst = 8 if is_ntpd else 4
        times += [start + 2.0 * i for i in range(burst) if start + 2.0 * i < end]
        t = start + 2.0 * (burst - 1)
        exponent, polls = MIN_POLL, 0
        while True:
            period = 2.0 ** exponent
            if exponent == max_poll and t + period < 0:
                t += (-t // period) * period  # skip ahead through the steady state
            t += period * rng.uniform(0.98, 1.02)
            if t >= end:
                break
            times.append(t)
            polls += 1
            if polls == POLLS_PER_STEP and exponent < max_poll:
                exponent, polls = exponent + 1, 0
        start = end
    for t in times:
        t_ns = int(t * NS_PER_S)
        if 0 <= t_ns < duration_ns:
            yield (t_ns, tag, client, Kind.NTPV4, src, port, ttl)


def _top_of_hour_marks(duration_ns: int, every_s: int) -> list[int]:
    """Offsets of minute 0 (every 3600 s) or of every 5th minute, inside the capture."""
    marks = []
    t = TOP_OF_HOUR_OFFSET_S % every_s
    while t * NS_PER_S < duration_ns:
        marks.append(t * NS_PER_S)
        t += every_s
    return marks


# ---------------------------------------------------------------------- the scenarios

def _netgear(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # Netgear MR814 & co.: SNTPv1 from port 23457, once a second, never backing off.
    pool = _AddressPool(rng, "10.16.0.0/12")
    streams = []
    for client in range(_count(500, scale)):
        first_ns = int(rng.random() * NS_PER_S)
        src = pool.draw()
        streams.append(_periodic(rng, first_ns, NS_PER_S, 0.001, duration_ns, tag, client,
                                 Kind.SNTPV1, src, 23457, _path_ttl(TTL_UNIX, src)))
    return _merge(streams)


def _sntpv1_fleet(rng: random.Random, cidr: str, devices: int, period_s: int,
                  duration_ns: int, tag: int) -> Iterator[Event]:
    """SNTPv1 firmware: each device from its own address and fixed port, every period."""
    pool = _AddressPool(rng, cidr)
    period = period_s * NS_PER_S
    streams = []
    for client in range(devices):
        first_ns = int(rng.random() * period)
        src = pool.draw()
        streams.append(_periodic(rng, first_ns, period, 0.01, duration_ns, tag, client,
                                 Kind.SNTPV1, src, _ephemeral_port(rng),
                                 _path_ttl(TTL_UNIX, src)))
    return _merge(streams)


def _dlink(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    return _sntpv1_fleet(rng, "10.32.0.0/12", _count(2083, scale), 60, duration_ns, tag)


def _smc(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    return _sntpv1_fleet(rng, "10.48.0.0/12", _count(1000, scale), 30, duration_ns, tag)


def _mobatime(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # 75 hosts on one site (one /24 per 75 hosts), 12e6 / 86400 / 75 = 1.85 requests/s each;
    # a site's hosts share its path (one TTL per /24).
    period = round(86_400 * 75 / 12_000_000 * NS_PER_S)
    hosts = _count(75, scale)
    return _merge(
        _periodic(rng, int(rng.random() * period), period, 0.05, duration_ns, tag, host,
                  Kind.NTPV4, bytes((10, 80, host // 75, host % 75 + 1)), NTPD_PORT,
                  _path_ttl(TTL_UNIX, bytes((10, 80, host // 75))))
        for host in range(hosts))


#: The TTLs the spoofers of spoofed-random and reflection-probes send with (one host
#: each; *assumed*).
SPOOFED_RANDOM_TTL = 51
REFLECTION_TTL = 55


def _spoofed(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # One packet from each of a huge number of sources: random addresses, random ports.
    rate = 500.0 * scale
    base = int(ipaddress.IPv4Address("10.128.0.0"))
    t = 0.0
    end_s = duration_ns / NS_PER_S
    client = 0
    while True:
        t += rng.expovariate(rate)
        if t >= end_s:
            return
        src = (base + rng.randrange(1, 1 << 23)).to_bytes(4, "big")
        yield (int(t * NS_PER_S), tag, client, Kind.NTPV4, src, rng.randrange(1024, 65536),
               SPOOFED_RANDOM_TTL)
        client += 1


#: The reflection victims' service ports (port 0, chargen 19, DNS 53).
REFLECTION_SOURCE_PORTS = (0, 19, 53)


def _reflection(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # Mode 6/7 probes and mode 3 requests "from" victims' service ports; none deserves a byte.
    victims = [bytes((198, 51, 100, host)) for host in range(1, 255)] + \
              [bytes((203, 0, 113, host)) for host in range(1, 255)]
    rate = 50.0 * scale
    t = 0.0
    end_s = duration_ns / NS_PER_S
    while True:
        t += rng.expovariate(rate)
        if t >= end_s:
            return
        victim = rng.randrange(len(victims))
        kind = rng.choice((Kind.MODE6_READVAR, Kind.MODE7_MONLIST, Kind.NTPV4))
        if kind is Kind.NTPV4 or rng.random() < 0.75:
            port = rng.choice(REFLECTION_SOURCE_PORTS)
        else:
            port = _ephemeral_port(rng)
        yield (int(t * NS_PER_S), tag, victim, kind, victims[victim], port, REFLECTION_TTL)


def _top_of_hour(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # Tasmota-style devices: one SNTPv4 request at minute 0 (clocks agree, so all within
    # ~2 s), several devices behind each home address. Cron'd ntpdate: 4 samples 2 s apart
    # (its -p default) from port 123 at minute 0, or every 5 minutes for half of them.
    # The devices run lwIP (initial TTL 255) one hop behind their home's router.
    homes = _AddressPool(rng, "10.96.0.0/12")
    servers = _AddressPool(rng, "10.112.0.0/12")
    hours = _top_of_hour_marks(duration_ns, 3600)
    fives = _top_of_hour_marks(duration_ns, 300)
    streams: list[Iterator[Event]] = []
    client = 0
    for _ in range(_count(1000, scale)):
        src = homes.draw()
        ttl = _path_ttl(TTL_LWIP, src) - 1
        for _ in range(rng.randint(1, 6)):
            port = _ephemeral_port(rng)
            events = [(mark + int(rng.random() * 2 * NS_PER_S), tag, client, Kind.NTPV4, src,
                       port, ttl) for mark in hours]
            streams.append(iter([e for e in events if e[0] < duration_ns]))
            client += 1
    for _ in range(_count(300, scale)):
        src = servers.draw()
        ttl = _path_ttl(TTL_UNIX, src)
        events = []
        for mark in (fives if rng.random() < 0.5 else hours):
            start = mark + int(rng.random() * NS_PER_S)
            events += [(start + sample * 2 * NS_PER_S, tag, client, Kind.NTPV4, src, NTPD_PORT,
                        ttl) for sample in range(4)]
        streams.append(iter([e for e in events if e[0] < duration_ns]))
        client += 1
    return _merge(streams)


def _chrony(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    pool = _AddressPool(rng, "10.0.0.0/12")
    return _merge(_ntp_client(rng, duration_ns, tag, client, src, _path_ttl(TTL_UNIX, src))
                  for client in range(_count(2000, scale)) for src in (pool.draw(),))


def _w32time(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # "polls hours apart": every 1-6 h (assumed spread), from port 123, mode 1, version 3.
    pool = _AddressPool(rng, "10.64.0.0/12")
    streams = []
    for client in range(_count(2000, scale)):
        period = int(rng.uniform(3600, 6 * 3600) * NS_PER_S)
        first_ns = int(rng.random() * period)
        src = pool.draw()
        streams.append(_periodic(rng, first_ns, period, 0.01, duration_ns, tag, client,
                                 Kind.W32TIME, src, NTPD_PORT, _path_ttl(TTL_WINDOWS, src)))
    return _merge(streams)


#: Clients behind one carrier-grade NAT address ("hundreds", incidents.md).
CGNAT_CLIENTS_PER_ADDRESS = 200


def _behind_nats(rng: random.Random, duration_ns: int, tag: int, block: str, addresses: int,
                 clients: int, port: Callable[[], int], max_poll: int | None = None
                 ) -> Iterator[Event]:
    """``clients`` chrony/ntpd clients behind each of ``addresses`` NAT addresses drawn
    from ``block``, each given the source port ``port()``."""
    pool = _AddressPool(rng, block)
    streams = []
    client = 0
    for _ in range(addresses):
        address = pool.draw()
        for _ in range(clients):
            streams.append(_ntp_client(rng, duration_ns, tag, client, address,
                                       _nat_ttl(address, client), port=port(),
                                       max_poll=max_poll))
            client += 1
    return _merge(streams)


def _cgnat(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # Each client is an ordinary chrony/ntpd client; the NAT maps each to its own high port.
    return _behind_nats(rng, duration_ns, tag, "100.64.0.0/10", _count(4, scale),
                        CGNAT_CLIENTS_PER_ADDRESS, lambda: _ephemeral_port(rng))


def _ipv6_hosts(rng: random.Random, scale: float, duration_ns: int, tag: int) -> Iterator[Event]:
    # Each host in its own /64 of 2001:db8::/32 (the documentation prefix).
    prefixes = _AddressPool(rng, "2001:db8::/32")
    streams = []
    for client in range(_count(1000, scale)):
        src = prefixes.draw()[:8] + rng.getrandbits(64).to_bytes(8, "big")
        streams.append(_ntp_client(rng, duration_ns, tag, client, src,
                                   _path_ttl(TTL_UNIX, src[:8])))
    return _merge(streams)


#: cgnat-800: the clients behind each address, every one held at a 64 s poll.
CGNAT_800_CLIENTS = 800


def _cgnat_800(rng: random.Random, scale: float, duration_ns: int, tag: int
               ) -> Iterator[Event]:
    # One address (scale: more of them), 800 chrony/ntpd clients at minpoll = maxpoll = 6
    # (64 s +- 2 %, random phases, an iburst only where a client restarts), 800 / 64 = 12.5
    # requests/s; the NAT maps every request to a fresh port (chronyd opens a socket per
    # request and a carrier NAT does not preserve ports), so no two share a port for long.
    # (port 0 here: _fresh_ports gives each request its own)
    return _fresh_ports(rng, _behind_nats(rng, duration_ns, tag, "172.16.0.0/16",
                                          _count(1, scale), CGNAT_800_CLIENTS, lambda: 0,
                                          max_poll=MIN_POLL), _nat_port)


#: chronyd with ``minpoll -2``: a request every 2^-2 s = 0.25 s (+- 1 %).
FAST_POLL_NS = NS_PER_S // 4
FAST_POLLERS = 5


def _fast_pollers(rng: random.Random, scale: float, duration_ns: int, tag: int,
                  block: str) -> list[Iterator[Event]]:
    pool = _AddressPool(rng, block)
    streams = []
    for client in range(_count(FAST_POLLERS, scale)):
        first_ns = int(rng.random() * FAST_POLL_NS)
        src = pool.draw()
        streams.append(_periodic(rng, first_ns, FAST_POLL_NS, 0.01, duration_ns, tag, client,
                                 Kind.NTPV4_FAST, src, _ephemeral_port(rng),
                                 _path_ttl(TTL_UNIX, src)))
    return streams


def _fast_poller(rng: random.Random, scale: float, duration_ns: int, tag: int
                 ) -> Iterator[Event]:
    # One fixed ephemeral port per host: chronyd with acquisitionport set, or a
    # long-lived socket.
    return _merge(_fast_pollers(rng, scale, duration_ns, tag, "172.17.0.0/16"))


def _fast_poller_random_ports(rng: random.Random, scale: float, duration_ns: int, tag: int
                              ) -> Iterator[Event]:
    # chronyd's default: a new socket, so a new random port, for every request.
    return _fresh_ports(rng, _merge(_fast_pollers(rng, scale, duration_ns, tag,
                                                  "172.18.0.0/16")))


#: spoofed-victim and victim-spoofer: the same victims (drawn from a generator seeded by
#: (seed, "victims") in both), the victims' own packets arriving with VICTIM_TTL and the
#: forged ones with SPOOFER_TTL. Four victims keep victim-spoofer at 120,000 packets in
#: 600 s (4 x 50/s).
VICTIMS_NETWORK = "172.20.0.0/16"
VICTIMS = 4
VICTIM_TTL = 57
SPOOFER_TTL = 44
VICTIM_FLOOD_RATE = 50.0
VICTIM_POLL_NS = 64 * NS_PER_S


def _victims(rng: ScenarioRandom, scale: float) -> list[bytes]:
    pool = _AddressPool(rng.shared("victims"), VICTIMS_NETWORK)
    return [pool.draw() for _ in range(_count(VICTIMS, scale))]


def _spoofed_victim(rng: ScenarioRandom, scale: float, duration_ns: int, tag: int
                    ) -> Iterator[Event]:
    # Each victim is a chrony client that starts in the first poll interval of the capture:
    # an iburst of 4 requests 2 s apart, then 64 s polls (+- 2 %), from one ephemeral port.
    streams: list[Iterator[Event]] = []
    for client, src in enumerate(_victims(rng, scale)):
        start_ns = int(rng.random() * VICTIM_POLL_NS)
        port = _ephemeral_port(rng)
        burst = [(start_ns + i * 2 * NS_PER_S, tag, client, Kind.NTPV4, src, port, VICTIM_TTL)
                 for i in range(4)]
        polls = _periodic(rng, burst[-1][0] + VICTIM_POLL_NS, VICTIM_POLL_NS, 0.02,
                          duration_ns, tag, client, Kind.NTPV4, src, port, VICTIM_TTL)
        streams.append(itertools.chain((e for e in burst if e[0] < duration_ns), polls))
    return _merge(streams)


def _victim_spoofer(rng: ScenarioRandom, scale: float, duration_ns: int, tag: int
                    ) -> Iterator[Event]:
    # A Poisson flood of 50 requests/s per victim, in the victim's name (its address, any
    # port), from a spoofer further away: its packets arrive with another TTL. It begins
    # one poll interval in, once every victim is a client the server knows (an attack on
    # an address the server has never seen is a flooder imitating a crowd: the cap, not
    # the TTL classes, bounds it; docs/filter.md).
    victims = _victims(rng, scale)
    rate = VICTIM_FLOOD_RATE * len(victims)
    t = VICTIM_POLL_NS / NS_PER_S + 2.0 * 4
    end_s = duration_ns / NS_PER_S
    while True:
        t += rng.expovariate(rate)
        if t >= end_s:
            return
        victim = rng.randrange(len(victims))
        yield (int(t * NS_PER_S), tag, victim, Kind.NTPV4, victims[victim],
               rng.randrange(1024, 65536), SPOOFER_TTL)


#: RIPE-Atlas-style NTP measurements: every 240 s (+- 1 %; *assumed*), 3 requests back to
#: back, each sent when the previous reply arrives (2-10 ms later; *assumed*), from one
#: ephemeral port per measurement.
ATLAS_INTERVAL_NS = 240 * NS_PER_S
ATLAS_PACKETS = 3


def _atlas_probe(rng: random.Random, duration_ns: int, tag: int, client: int, src: bytes
                 ) -> Iterator[Event]:
    ttl = _path_ttl(TTL_UNIX, src)
    t = int(rng.random() * ATLAS_INTERVAL_NS)
    while t < duration_ns:
        port = _ephemeral_port(rng)
        sent = t
        for _ in range(ATLAS_PACKETS):
            if sent >= duration_ns:
                break
            yield (sent, tag, client, Kind.NTPV4, src, port, ttl)
            sent += int(rng.uniform(0.002, 0.010) * NS_PER_S)
        t += ATLAS_INTERVAL_NS + int((rng.random() * 2 - 1) * 0.01 * ATLAS_INTERVAL_NS)


def _ripe_atlas(rng: random.Random, scale: float, duration_ns: int, tag: int
                ) -> Iterator[Event]:
    pool = _AddressPool(rng, "172.24.0.0/14")
    return _merge([_atlas_probe(rng, duration_ns, tag, client, pool.draw())
                   for client in range(_count(1000, scale))])


#: deny-loop: a client that re-sends at once on every DENY / KoD / reply failure sends as
#: fast as its round trip allows: 10 ms (+- 10 %; *assumed*), 100 requests/s, one port.
DENY_LOOP_RTT_NS = NS_PER_S // 100


def _deny_loop(rng: random.Random, scale: float, duration_ns: int, tag: int
               ) -> Iterator[Event]:
    # Open-loop: the replay does not feed the filter's answers back, so the rate the loop
    # would reach is modelled here, not caused by what the filter sends.
    pool = _AddressPool(rng, "172.19.0.0/16")
    streams = []
    for client in range(_count(1, scale)):
        first_ns = int(rng.random() * DENY_LOOP_RTT_NS)
        src = pool.draw()
        streams.append(_periodic(rng, first_ns, DENY_LOOP_RTT_NS, 0.1, duration_ns, tag,
                                 client, Kind.NTPV4, src, _ephemeral_port(rng),
                                 _path_ttl(TTL_UNIX, src)))
    return _merge(streams)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("netgear-2003", ABUSIVE, "SNTPv1 from port 23457, 1/s per device, no back-off",
             ("10.16.0.0/12",), _netgear),
    Scenario("dlink-2005", ABUSIVE, "SNTPv1 from a hard-coded server list, millions a day",
             ("10.32.0.0/12",), _dlink),
    Scenario("smc-2003", ABUSIVE, "SNTPv1 firmware retrying twice a minute",
             ("10.48.0.0/12",), _smc),
    Scenario("mobatime-2009", ABUSIVE, "75 hosts on one site, ~12 million requests a day",
             ("10.80.0.0/16",), _mobatime),
    Scenario("spoofed-random", ABUSIVE, "one packet each from a huge number of random sources",
             ("10.128.0.0/9",), _spoofed),
    Scenario("reflection-probes", ABUSIVE, "mode 6/7 probes, requests from ports 0, 19, 53",
             ("198.51.100.0/24", "203.0.113.0/24"), _reflection),
    Scenario("top-of-hour", LEGITIMATE, "IoT devices and cron'd ntpdate at minute 0",
             ("10.96.0.0/12", "10.112.0.0/12"), _top_of_hour),
    Scenario("chrony", LEGITIMATE, "chrony/ntpd: iburst, then 64-1024 s polling",
             ("10.0.0.0/12",), _chrony),
    Scenario("w32time", LEGITIMATE, "Windows w32time: mode 1, version 3, hours apart",
             ("10.64.0.0/12",), _w32time),
    Scenario("cgnat", LEGITIMATE, "hundreds of chrony/ntpd clients behind one IPv4 address",
             ("100.64.0.0/10",), _cgnat),
    Scenario("ipv6-hosts", LEGITIMATE, "chrony/ntpd clients on IPv6, one /64 each",
             ("2001:db8::/32",), _ipv6_hosts),
    Scenario("cgnat-800", LEGITIMATE, "800 clients at 64 s polls behind one CGNAT address, "
             "a fresh port per request", ("172.16.0.0/16",), _cgnat_800),
    Scenario("fast-poller", ABUSIVE, "chronyd with minpoll -2: every 0.25 s from one port",
             ("172.17.0.0/16",), _fast_poller),
    Scenario("fast-poller-random-ports", ABUSIVE,
             "chronyd with minpoll -2: every 0.25 s, a new port each time",
             ("172.18.0.0/16",), _fast_poller_random_ports),
    Scenario("spoofed-victim", LEGITIMATE, "chrony clients whose addresses victim-spoofer "
             "forges (TTL 57)", (VICTIMS_NETWORK,), _spoofed_victim),
    Scenario("victim-spoofer", ABUSIVE, "50/s per victim forged in spoofed-victim's names "
             "(TTL 44)", (VICTIMS_NETWORK,), _victim_spoofer),
    Scenario("ripe-atlas", LEGITIMATE, "measurement probes: 3 requests back to back every "
             "240 s", ("172.24.0.0/14",), _ripe_atlas),
    Scenario("deny-loop", ABUSIVE, "a client re-sending at once on every DENY / KoD: "
             "100/s (open-loop)", ("172.19.0.0/16",), _deny_loop),
)}

#: Named mixes; any list of scenario and mix names is a mix too.
MIXES: dict[str, tuple[str, ...]] = {
    "floods": tuple(s.name for s in SCENARIOS.values() if s.klass == ABUSIVE),
    "normal": tuple(s.name for s in SCENARIOS.values() if s.klass == LEGITIMATE),
    "all": tuple(SCENARIOS),
}


def resolve_names(names: Iterable[str]) -> list[str]:
    """Scenario and mix names -> scenario names, in order, without repeats."""
    resolved: list[str] = []
    for name in names:
        if name in MIXES:
            expanded: Iterable[str] = MIXES[name]
        elif name in SCENARIOS:
            expanded = (name,)
        else:
            raise ValueError(f"unknown scenario {name!r} (scenarios: {', '.join(SCENARIOS)}; "
                             f"mixes: {', '.join(MIXES)})")
        resolved += [n for n in expanded if n not in resolved]
    if not resolved:
        raise ValueError("no scenario given")
    return resolved


def mix_events(names: list[str], seed: int, scale: float, duration_ns: int) -> Iterator[Event]:
    """The events of several scenarios, merged in time order; tag = index in ``names``.

    Each scenario draws from its own generator seeded by (seed, name), so adding a
    scenario to a mix leaves the others' packets unchanged (values meant to be shared
    come from :meth:`ScenarioRandom.shared`, the same in every scenario).
    """
    if scale <= 0:
        raise ValueError("scale must be positive")
    if duration_ns <= 0:
        raise ValueError("duration must be positive")
    streams = [SCENARIOS[name].events(ScenarioRandom(seed, name), scale, duration_ns, tag)
               for tag, name in enumerate(names)]
    return heapq.merge(*streams)
