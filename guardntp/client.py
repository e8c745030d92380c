"""SNTP client: one exchange is a request we build and a reply we judge.

The pure half (:func:`build_request`, :func:`stray_reason`, :func:`evaluate_reply`,
:func:`usable`, :func:`root_distance_problem`, :func:`panic_warning`) takes every
time as an argument; :func:`exchange` and :func:`query` are the socket edge used
by ``guardntp query`` and by the ``upstream`` time source, and
:func:`exchange_request` / :func:`take_samples` the same wait and loop for a request
made elsewhere (``guardntp query --nts`` plugs in NTS requests and their checks).

Rules (RFC 4330 §5 and §8, RFC 5905 §8):

* the transmit field is a random 64-bit value (the NTP data-minimisation draft),
  so the request reveals nothing of our clock; we remember our own send time;
* while waiting, a datagram is the reply only if it comes from the address and
  port asked, parses as NTP, answers our mode and carries our random value as
  its origin, bit for bit; anything else is a stray: dropped, counted, and we
  keep waiting until the timeout (a spoofer must not be able to spoil an exchange);
* stratum 0 with a kiss code is a Kiss-o'-Death: we report its code and never
  retry faster;
* LI=3, stratum 0 without a kiss code, or stratum 16 and above is an
  unsynchronised server: no time is taken from it;
* a synchronised reply is still unusable past the sanity limits below, which
  ``--clock upstream`` and ``--clock system`` share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .clock import MAX_DISPERSION_NS
from .timestamps import NS_PER_S, ntp_diff_ns, short_to_ns, unix_ns_to_ntp
from .wire import STRATUM_UNSPECIFIED, Leap, MalformedPacket, Mode, NtpPacket, encode, parse

log = logging.getLogger("guardntp.client")

#: RFC 4330 §10: an SNTP client must not poll a server more often than every 15 s;
#: within one `query --samples N` we space requests 2 s apart like ntpd's iburst.
SAMPLE_SPACING_S = 2.0

#: chrony's ``maxdistance`` default: a source whose root distance (half the round
#: trip to the reference clock plus the dispersion) exceeds 3 s is not used.
MAX_ROOT_DISTANCE_NS = 3 * NS_PER_S
#: RFC 5905 MAXDISP (16 s): a root dispersion there, or a root delay that puts
#: the root distance there, is a server saying its time means nothing (chrony's
#: packet test 7 drops such replies).
MAX_ROOT_DISPERSION_NS = MAX_DISPERSION_NS
#: ntpd's panic threshold (``tinker panic``): an offset beyond 1000 s is more
#: likely a broken server or a wrong local date than a real correction.
PANIC_THRESHOLD_NS = 1000 * NS_PER_S

#: Enough for a 48-byte header plus any MAC or extension fields a server may add;
#: a longer datagram would be cut and then fail to parse (counted as malformed).
RECEIVE_BUFFER = 4096


@dataclass(frozen=True, slots=True)
class ExchangeStats:
    """Datagrams one exchange (or several, added up) dropped while waiting for its reply."""

    wrong_source: int = 0      # not from the address and port asked
    malformed: int = 0         # shorter than 48 bytes, unaligned, bad version or tail
    wrong_mode: int = 0        # e.g. a broadcast (mode 5) or a request
    wrong_origin: int = 0      # not an answer to this request: stale or spoofed
    port_unreachable: int = 0  # ICMP errors, which anyone on the path can forge

    @property
    def ignored(self) -> int:
        return (self.wrong_source + self.malformed + self.wrong_mode + self.wrong_origin
                + self.port_unreachable)

    def counts(self) -> dict[str, int]:
        """The nonzero counts by reason (``{"wrong_origin": 2}``)."""
        return {name: value for name, value in
                ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)) if value}

    def __add__(self, other: ExchangeStats) -> ExchangeStats:
        return ExchangeStats(**{name: getattr(self, name) + getattr(other, name)
                                for name in (f.name for f in dataclasses.fields(self))})

    def describe(self) -> str:
        """``"2 stray datagrams ignored (wrong origin)"``, or "" when none was."""
        counts = self.counts()
        if not counts:
            return ""
        total = self.ignored
        if len(counts) == 1:
            why = _STRAY_LABELS[next(iter(counts))]
        else:
            why = ", ".join(f"{count} {_STRAY_LABELS[name]}" for name, count in counts.items())
        return f"{total} stray datagram{'s' if total != 1 else ''} ignored ({why})"


_STRAY_LABELS = {"wrong_source": "from another address", "malformed": "malformed",
                 "wrong_mode": "wrong mode", "wrong_origin": "wrong origin",
                 "port_unreachable": "ICMP port unreachable"}

NO_STRAYS = ExchangeStats()


class BogusReply(Exception):
    """A reply to our request that carries no usable time (unsynchronised, bad MAC...).

    ``packet`` is the reply when it parsed; ``stats`` what the exchange dropped first.
    """

    def __init__(self, message: str, packet: NtpPacket | None = None) -> None:
        super().__init__(message)
        self.packet = packet
        self.stats = NO_STRAYS


class KissOfDeath(Exception):
    """The server sent a Kiss-o'-Death; ``code`` is its four-letter kiss code."""

    def __init__(self, code: str, packet: NtpPacket) -> None:
        super().__init__(f"server sent Kiss-o'-Death {code}")
        self.code = code
        self.packet = packet
        self.stats = NO_STRAYS


class NoReply(TimeoutError):
    """No reply to our request within the timeout; ``stats`` says what came instead."""

    def __init__(self, message: str, stats: ExchangeStats = NO_STRAYS) -> None:
        super().__init__(message)
        self.stats = stats


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured exchange. Offset and delay in ns; the rest as the server sent it.

    ``stats`` counts the stray datagrams dropped while waiting for this reply.
    """

    offset_ns: int
    delay_ns: int
    packet: NtpPacket
    stats: ExchangeStats = NO_STRAYS

    @property
    def stratum(self) -> int:
        return self.packet.stratum

    @property
    def root_delay_ns(self) -> int:
        return short_to_ns(self.packet.root_delay)

    @property
    def root_dispersion_ns(self) -> int:
        return short_to_ns(self.packet.root_dispersion)

    @property
    def root_distance_ns(self) -> int:
        return (self.root_delay_ns + self.delay_ns) // 2 + self.root_dispersion_ns


@dataclass(frozen=True, slots=True)
class PendingRequest:
    wire: bytes
    transmit_field: int      # the random value we put in the transmit field
    mode: Mode

    @property
    def reply_mode(self) -> Mode:
        return Mode.SYMMETRIC_PASSIVE if self.mode == Mode.SYMMETRIC_ACTIVE else Mode.SERVER


def build_request(random_transmit: int, version: int = 4, mode: Mode = Mode.CLIENT,
                  poll: int = 0) -> PendingRequest:
    """A data-minimised request: version, mode, poll and a random transmit field."""
    packet = NtpPacket(leap=Leap.NONE, version=version, mode=mode, poll=poll,
                       transmit_ts=random_transmit)
    return PendingRequest(encode(packet), random_transmit, mode)


def stray_reason(data: bytes, pending: PendingRequest) -> tuple[str, str] | None:
    """Why a datagram is not the reply to ``pending``, as (counter name, what was seen),
    or None when it is. Judged on the header alone, before any MAC is checked."""
    try:
        packet = parse(data)
    except MalformedPacket as error:
        return "malformed", f"{len(data)}-byte datagram ({error.reason})"
    if packet.mode != pending.reply_mode:
        return "wrong_mode", f"mode {int(packet.mode)} ({_mode_name(packet.mode)}) packet"
    if packet.origin_ts != pending.transmit_field:
        return "wrong_origin", "reply with wrong origin"
    return None


def _mode_name(mode: Mode) -> str:
    return mode.name.lower().replace("_", " ")


def evaluate_reply(reply: bytes, pending: PendingRequest, t1_unix_ns: int, t4_unix_ns: int,
                   ) -> Sample:
    """Judge a reply. Returns a :class:`Sample`, or raises :class:`BogusReply` /
    :class:`KissOfDeath`. ``t1``/``t4`` are our own send and receive times."""
    try:
        packet = parse(reply)
    except MalformedPacket as error:
        raise BogusReply(f"malformed reply ({error})") from None
    expected_mode = pending.reply_mode
    if packet.mode != expected_mode:
        raise BogusReply(f"reply has mode {int(packet.mode)} ({_mode_name(packet.mode)}), "
                         f"expected {int(expected_mode)} ({_mode_name(expected_mode)})",
                         packet)
    if packet.origin_ts != pending.transmit_field:
        raise BogusReply("origin timestamp does not match our request (stale or spoofed reply)",
                         packet)
    if packet.stratum == 0 and all(65 <= byte <= 90 or 48 <= byte <= 57 for byte in packet.refid):
        # A kiss code is four ASCII letters (RFC 5905 §7.4); an unsynchronised server
        # (chrony's habit, and ours) sends stratum 0 with a zero refid instead.
        raise KissOfDeath(packet.kiss_code, packet)
    unsynchronised = unsynchronised_because(packet)
    if unsynchronised:
        raise BogusReply(f"server is not synchronised ({unsynchronised})", packet)
    empty = [name for name, value in (("receive", packet.receive_ts),
                                      ("transmit", packet.transmit_ts)) if value == 0]
    if empty:
        raise BogusReply(f"server left its {' and '.join(empty)} timestamp"
                         f"{'s' if len(empty) > 1 else ''} empty", packet)
    t1 = unix_ns_to_ntp(t1_unix_ns)
    t4 = unix_ns_to_ntp(t4_unix_ns)
    t2, t3 = packet.receive_ts, packet.transmit_ts
    offset_ns = (ntp_diff_ns(t2, t1) + ntp_diff_ns(t3, t4)) // 2
    delay_ns = ntp_diff_ns(t4, t1) - ntp_diff_ns(t3, t2)
    if delay_ns < 0:
        # The server's own processing time exceeds the round trip: clamp, as ntpd does.
        delay_ns = 0
    return Sample(offset_ns, delay_ns, packet)


def unsynchronised_because(packet: NtpPacket) -> str:
    """What in a (non-KoD) reply says the server has no time to give, or ""."""
    seen = []
    if packet.leap == Leap.UNSYNCHRONIZED:
        seen.append("LI=3")
    if packet.stratum == 0:
        seen.append(f"stratum 0 without a kiss code, refid 0x{packet.refid.hex()}")
    elif packet.stratum == STRATUM_UNSPECIFIED:
        seen.append("stratum 16")
    elif packet.stratum > STRATUM_UNSPECIFIED:
        seen.append(f"stratum {packet.stratum}, above 16")
    return ", ".join(seen)


def usable(sample: Sample) -> str | None:
    """Why a synchronised sample must still not be used, naming the value; None if usable.

    The same limits for ``guardntp query``, ``--clock upstream`` and ``--clock system``
    (which checks chronyd's own figures with :func:`root_distance_problem`).
    """
    return root_distance_problem(sample.root_delay_ns, sample.root_dispersion_ns,
                                 sample.delay_ns)


def root_distance_problem(root_delay_ns: int, root_dispersion_ns: int, delay_ns: int = 0,
                          ) -> str | None:
    """The sanity limits on a clock's error estimate (``delay_ns``: our round trip to
    it, 0 for a local clock), as a reason naming the value; None when within them."""
    if root_dispersion_ns >= MAX_ROOT_DISPERSION_NS:
        return (f"root dispersion {seconds(root_dispersion_ns):.3f} s is not below the "
                f"{seconds(MAX_ROOT_DISPERSION_NS):g} s maximum")
    if root_delay_ns // 2 + root_dispersion_ns >= MAX_ROOT_DISPERSION_NS:
        return (f"root delay {seconds(root_delay_ns):.3f} s puts the root distance past the "
                f"{seconds(MAX_ROOT_DISPERSION_NS):g} s maximum")
    distance = (root_delay_ns + delay_ns) // 2 + root_dispersion_ns
    if distance > MAX_ROOT_DISTANCE_NS:
        return (f"root distance {seconds(distance):.3f} s exceeds "
                f"{seconds(MAX_ROOT_DISTANCE_NS):g} s (root delay {seconds(root_delay_ns):.3f} s, "
                f"root dispersion {seconds(root_dispersion_ns):.3f} s"
                + (f", round trip {seconds(delay_ns):.3f} s)" if delay_ns else ")"))
    return None


def panic_warning(sample: Sample) -> str | None:
    """A warning when the offset is beyond :data:`PANIC_THRESHOLD_NS`, else None."""
    if abs(sample.offset_ns) <= PANIC_THRESHOLD_NS:
        return None
    return (f"offset {seconds(sample.offset_ns):+.3f} s is beyond the "
            f"{seconds(PANIC_THRESHOLD_NS):g} s panic threshold")


def best_sample(samples: list[Sample]) -> Sample:
    """The lowest-delay sample is the least disturbed by queueing (RFC 5905 §10 clock filter)."""
    return min(samples, key=lambda sample: sample.delay_ns)


# ----------------------------------------------------------------------------- edge

def resolve(host: str, port: int) -> tuple[int, tuple[object, ...]]:
    """(family, sockaddr) for a host name or address. Raises ``OSError``
    (``socket.gaierror`` when the name does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except UnicodeError as error:
        # The IDNA codec refuses over-long or empty labels before any lookup.
        raise socket.gaierror(socket.EAI_NONAME, f"invalid host name ({error})") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


@dataclass(frozen=True, slots=True)
class Request:
    """One request as :func:`exchange_request` sends it and how it judges the answer:
    ``pending`` is the header (its random transmit field and mode decide what is a
    stray), ``wire`` the datagram sent (the header, or the header plus a MAC or NTS
    extension fields), ``verify`` checks a datagram that passed the stray tests and
    returns the bytes to judge (raising :class:`BogusReply` or :class:`KissOfDeath`)."""

    pending: PendingRequest
    wire: bytes
    verify: Callable[[bytes], bytes] | None = None


def exchange(host: str, port: int, timeout_s: float = 2.0, version: int = 4,
             mode: Mode = Mode.CLIENT,
             sign: Callable[[bytes], bytes] | None = None,
             verify: Callable[[bytes], bytes] | None = None,
             clock_ns: Callable[[], int] = time.time_ns) -> Sample:
    """Send one request and judge the reply. ``sign`` adds a MAC to the request,
    ``verify`` checks and strips the reply's MAC (raising :class:`BogusReply`).

    Stray datagrams are dropped and counted in the sample's ``stats``; raises
    :class:`NoReply` (a ``TimeoutError``), :class:`BogusReply`, :class:`KissOfDeath`,
    or ``OSError`` (``socket.gaierror`` for a name that does not resolve).
    """
    pending = build_request(secrets.randbits(64), version, mode)
    wire = sign(pending.wire) if sign else pending.wire
    return exchange_request(host, port, Request(pending, wire, verify), timeout_s, clock_ns)


def exchange_request(host: str, port: int, request: Request, timeout_s: float = 2.0,
                     clock_ns: Callable[[], int] = time.time_ns) -> Sample:
    """:func:`exchange` for a request made elsewhere (``guardntp query --nts``): the
    same wait, stray handling, errors and judgement of the reply."""
    family, sockaddr = resolve(host, port)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    pending, wire, verify = request.pending, request.wire, request.verify
    strays: Counter[str] = Counter()
    last_stray = ""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Connected: the kernel itself drops datagrams from other addresses and ports.
        sock.connect(sockaddr)
        t1 = clock_ns()
        sock.send(wire)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stats = ExchangeStats(**strays)
                detail = f"; {stats.describe()}" if strays else ""
                if len(strays) > 1 or strays and not last_stray.endswith(
                        _STRAY_LABELS[next(iter(strays))]):
                    detail += f", last: {last_stray}"
                raise NoReply(f"no reply from {where} within {timeout_s:g} s{detail}", stats)
            sock.settimeout(remaining)
            try:
                data, source = sock.recvfrom(RECEIVE_BUFFER)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                # An ICMP error proves nothing (it is easily forged): keep waiting.
                strays["port_unreachable"] += 1
                last_stray = "ICMP port unreachable"
                log.debug("%s: ICMP port unreachable ignored", where)
                continue
            t4 = clock_ns()
            if not same_peer(source, sockaddr):
                stray: tuple[str, str] | None = ("wrong_source", f"datagram from {source[0]}")
            else:
                stray = stray_reason(data, pending)
            if stray is not None:
                strays[stray[0]] += 1
                last_stray = stray[1]
                log.debug("%s: %s ignored", where, stray[1])
                continue
            stats = ExchangeStats(**strays)
            try:
                if verify is not None:
                    data = verify(data)
                sample = evaluate_reply(data, pending, t1, t4)
            except (BogusReply, KissOfDeath) as error:
                error.stats = stats
                raise
            return dataclasses.replace(sample, stats=stats) if strays else sample


def same_peer(source: tuple[object, ...], asked: tuple[object, ...]) -> bool:
    """Whether a datagram's source is the address and port we asked (scope ids aside)."""
    def key(address: tuple[object, ...]) -> tuple[str, object]:
        host = str(address[0]).partition("%")[0]
        with contextlib.suppress(ValueError):
            host = ipaddress.ip_address(host).compressed
        return host, address[1]
    return key(source) == key(asked)


def query(host: str, port: int, samples: int = 1, timeout_s: float = 2.0, version: int = 4,
          mode: Mode = Mode.CLIENT, spacing_s: float = SAMPLE_SPACING_S,
          sign: Callable[[bytes], bytes] | None = None,
          verify: Callable[[bytes], bytes] | None = None) -> tuple[Sample, list[Sample]]:
    """Take up to ``samples`` exchanges and return (best, all). A KoD ends the run at once."""
    return take_samples(lambda: exchange(host, port, timeout_s, version, mode, sign, verify),
                        samples, spacing_s)


def take_samples(once: Callable[[], Sample | None], samples: int,
                 spacing_s: float = SAMPLE_SPACING_S) -> tuple[Sample, list[Sample]]:
    """:func:`query`'s loop over any exchange: up to ``samples`` calls of ``once``,
    ``spacing_s`` apart, and (best, all). A timeout or a bogus reply is kept for the
    end (raised when no sample was taken), a KoD ends the run at once; ``once``
    returns None when it cannot make another exchange (an NTS client out of cookies)."""
    taken: list[Sample] = []
    last_error: Exception | None = None
    for index in range(samples):
        if index:
            time.sleep(spacing_s)
        try:
            sample = once()
        except (TimeoutError, BogusReply) as error:
            last_error = error
            continue
        if sample is None:
            break
        taken.append(sample)
    if not taken:
        raise last_error or NoReply("no exchange could be made")
    return best_sample(taken), taken


def seconds(ns: int) -> float:
    return ns / NS_PER_S
