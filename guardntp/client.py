"""SNTP client: one exchange is a request we build and a reply we judge.

The pure half (:func:`build_request`, :func:`evaluate_reply`) takes every time
as an argument; :func:`exchange` and :func:`query` are the socket edge used by
``guardntp query`` and by the ``upstream`` time source.

Rules (RFC 4330 §5 and §8, RFC 5905 §8):

* the transmit field is a random 64-bit value (the NTP data-minimisation draft),
  so the request reveals nothing of our clock; we remember our own send time;
* a reply counts only if its origin equals that random value bit for bit, its
  mode answers ours, and its receive and transmit fields are set;
* stratum 0 is a Kiss-o'-Death: we report its code and never retry faster;
* LI=3 or stratum 16 is an unsynchronised server: no time is taken from it.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .timestamps import NS_PER_S, ntp_diff_ns, short_to_ns, unix_ns_to_ntp
from .wire import STRATUM_UNSPECIFIED, Leap, MalformedPacket, Mode, NtpPacket, encode, parse

#: RFC 4330 §10: an SNTP client must not poll a server more often than every 15 s;
#: within one `query --samples N` we space requests 2 s apart like ntpd's iburst.
SAMPLE_SPACING_S = 2.0


class BogusReply(Exception):
    """A reply that carries no usable time (wrong origin, wrong mode, unsynchronised...)."""


class KissOfDeath(Exception):
    """The server sent a Kiss-o'-Death; ``code`` is its four-letter kiss code."""

    def __init__(self, code: str, packet: NtpPacket) -> None:
        super().__init__(f"server sent Kiss-o'-Death {code}")
        self.code = code
        self.packet = packet


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured exchange. Offset and delay in ns; the rest as the server sent it."""

    offset_ns: int
    delay_ns: int
    packet: NtpPacket

    @property
    def stratum(self) -> int:
        return self.packet.stratum

    @property
    def root_distance_ns(self) -> int:
        return (short_to_ns(self.packet.root_delay) + self.delay_ns) // 2 \
            + short_to_ns(self.packet.root_dispersion)


@dataclass(frozen=True, slots=True)
class PendingRequest:
    wire: bytes
    transmit_field: int      # the random value we put in the transmit field
    mode: Mode


def build_request(random_transmit: int, version: int = 4, mode: Mode = Mode.CLIENT,
                  poll: int = 0) -> PendingRequest:
    """A data-minimised request: version, mode, poll and a random transmit field."""
    packet = NtpPacket(leap=Leap.NONE, version=version, mode=mode, poll=poll,
                       transmit_ts=random_transmit)
    return PendingRequest(encode(packet), random_transmit, mode)


def evaluate_reply(reply: bytes, pending: PendingRequest, t1_unix_ns: int, t4_unix_ns: int,
                   ) -> Sample:
    """Judge a reply. Returns a :class:`Sample`, or raises :class:`BogusReply` /
    :class:`KissOfDeath`. ``t1``/``t4`` are our own send and receive times."""
    try:
        packet = parse(reply)
    except MalformedPacket as error:
        raise BogusReply(f"malformed reply ({error})") from None
    expected_mode = Mode.SYMMETRIC_PASSIVE if pending.mode == Mode.SYMMETRIC_ACTIVE \
        else Mode.SERVER
    if packet.mode != expected_mode:
        raise BogusReply(f"reply has mode {packet.mode.name.lower()}, expected "
                         f"{expected_mode.name.lower()}")
    if packet.origin_ts != pending.transmit_field:
        raise BogusReply("origin timestamp does not match our request (stale or spoofed reply)")
    if packet.stratum == 0 and all(65 <= byte <= 90 or 48 <= byte <= 57 for byte in packet.refid):
        # A kiss code is four ASCII letters (RFC 5905 §7.4); an unsynchronised server
        # (chrony's habit, and ours) sends stratum 0 with a zero refid instead.
        raise KissOfDeath(packet.kiss_code, packet)
    if packet.leap == Leap.UNSYNCHRONIZED or packet.stratum in (0, STRATUM_UNSPECIFIED) \
            or packet.stratum > STRATUM_UNSPECIFIED:
        raise BogusReply("server is not synchronised (LI=3 or stratum 16)")
    if packet.transmit_ts == 0 or packet.receive_ts == 0:
        raise BogusReply("server left its receive or transmit timestamp empty")
    t1 = unix_ns_to_ntp(t1_unix_ns)
    t4 = unix_ns_to_ntp(t4_unix_ns)
    t2, t3 = packet.receive_ts, packet.transmit_ts
    offset_ns = (ntp_diff_ns(t2, t1) + ntp_diff_ns(t3, t4)) // 2
    delay_ns = ntp_diff_ns(t4, t1) - ntp_diff_ns(t3, t2)
    if delay_ns < 0:
        # The server's own processing time exceeds the round trip: clamp, as ntpd does.
        delay_ns = 0
    return Sample(offset_ns, delay_ns, packet)


def best_sample(samples: list[Sample]) -> Sample:
    """The lowest-delay sample is the least disturbed by queueing (RFC 5905 §10 clock filter)."""
    return min(samples, key=lambda sample: sample.delay_ns)


# ----------------------------------------------------------------------------- edge

def resolve(host: str, port: int) -> tuple[int, tuple[object, ...]]:
    """(family, sockaddr) for a host name or address. Raises ``OSError``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def exchange(host: str, port: int, timeout_s: float = 2.0, version: int = 4,
             mode: Mode = Mode.CLIENT,
             sign: Callable[[bytes], bytes] | None = None,
             verify: Callable[[bytes], bytes] | None = None,
             clock_ns: Callable[[], int] = time.time_ns) -> Sample:
    """Send one request and judge the reply. ``sign`` adds a MAC to the request,
    ``verify`` checks and strips the reply's MAC (raising :class:`BogusReply`)."""
    family, sockaddr = resolve(host, port)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    pending = build_request(secrets.randbits(64), version, mode)
    wire = sign(pending.wire) if sign else pending.wire
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(sockaddr)
        t1 = clock_ns()
        sock.send(wire)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from {where} within {timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                reply = sock.recv(1024)
            except TimeoutError:
                raise TimeoutError(f"no reply from {where} within {timeout_s:g} s") \
                    from None
            t4 = clock_ns()
            if verify is not None:
                reply = verify(reply)
            try:
                return evaluate_reply(reply, pending, t1, t4)
            except BogusReply as error:
                if "origin" in str(error):
                    continue  # a stale or forged datagram: keep waiting for ours
                raise


def query(host: str, port: int, samples: int = 1, timeout_s: float = 2.0, version: int = 4,
          mode: Mode = Mode.CLIENT, spacing_s: float = SAMPLE_SPACING_S,
          sign: Callable[[bytes], bytes] | None = None,
          verify: Callable[[bytes], bytes] | None = None) -> tuple[Sample, list[Sample]]:
    """Take up to ``samples`` exchanges and return (best, all). A KoD ends the run at once."""
    taken: list[Sample] = []
    last_error: Exception | None = None
    for index in range(samples):
        if index:
            time.sleep(spacing_s)
        try:
            taken.append(exchange(host, port, timeout_s, version, mode, sign, verify))
        except (TimeoutError, BogusReply) as error:
            last_error = error
    if not taken:
        assert last_error is not None
        raise last_error
    return best_sample(taken), taken


def seconds(ns: int) -> float:
    return ns / NS_PER_S
