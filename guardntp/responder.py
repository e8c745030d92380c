"""The stateless responder: request bytes in, reply bytes or a verdict out.

Rule: no I/O, no clock reads, no per-client state. Everything the reply depends
on is an argument: the request, its source port, its receive timestamp, the
clock snapshot and ``now_ns``. The server's socket loop (``server.py``) and the
filter (``guardntp/filter``) call into this module; it calls nothing back.

Decisions follow ``shared/docs/protocol-rules.md`` (RFC 5905 §8-9, RFC 4330 §5-6):

* versions 1-4 are answered with the request's version and poll copied;
* mode 3 gets mode 4; mode 1 (w32time, old WinXP SNTP) gets a stateless mode 2
  (as chrony does; configurable); NTPv1 mode 0 from a port other than 123 is a
  client request (chrony and NTPsec do the same); everything else gets nothing;
* the origin timestamp is the request's transmit field copied byte for byte;
* a reply is never longer than its request: requests shorter than 48 bytes are
  dropped, replies are 48 bytes plus a MAC of the request's own length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .clock import ClockState
from .timestamps import NS_PER_S, NTP_UNIX_OFFSET_S, TS_MASK, unix_ns_to_ntp
from .verdicts import Reason
from .wire import (
    HEADER_LEN,
    MAX_MAC_LEN,
    MAX_V4_BARE_MAC_LEN,
    MalformedPacket,
    Mode,
    TailKind,
    parse_tail,
)

NTP_PORT = 123

#: A time reply as one struct: LI|VN|mode and stratum, poll, precision + root delay,
#: root dispersion, refid, reference ts (``_fields``), origin, receive, transmit.
_TIME_REPLY = struct.Struct(">2sB21s8sQQ")
_UNIX_EPOCH_NTP = NTP_UNIX_OFFSET_S << 32

#: What each request mode gets. ``None`` means "answer"; otherwise the drop reason.
_MODE_DROP: dict[int, Reason | None] = {
    Mode.RESERVED: Reason.RESERVED_MODE,
    Mode.SYMMETRIC_ACTIVE: None,
    Mode.SYMMETRIC_PASSIVE: Reason.NOT_A_REQUEST,
    Mode.CLIENT: None,
    Mode.SERVER: Reason.NOT_A_REQUEST,
    Mode.BROADCAST: Reason.NOT_A_REQUEST,
    Mode.CONTROL: Reason.CONTROL_MODE,
    Mode.PRIVATE: Reason.PRIVATE_MODE,
}
_REPLY_MODE = {Mode.SYMMETRIC_ACTIVE: Mode.SYMMETRIC_PASSIVE, Mode.CLIENT: Mode.SERVER,
               Mode.RESERVED: Mode.SERVER}


@dataclass(frozen=True, slots=True)
class Request:
    """What the responder learned from a request it will answer."""

    version: int
    reply_mode: int
    mac_key_id: int | None = None   # set when the request carries a MAC
    mac_offset: int = 0             # where the MAC starts (the signed part ends)
    mac_len: int = 0                # key id + digest, in bytes
    #: NTPv4 tails of 25-68 bytes that parse as extension fields may instead be one
    #: long MAC (NTPsec's ntpdig sends full SHA-2 digests). chrony settles it by trying
    #: the key first; the auth stage does the same with this reading.
    whole_tail_mac: Request | None = None


def inspect_request(data: bytes, source_port: int, answer_symmetric: bool = True
                    ) -> Request | Reason:
    """Sanity stage: a :class:`Request` to answer, or the :class:`Reason` to drop it."""
    length = len(data)
    if length < HEADER_LEN or length % 4:
        return Reason.MALFORMED
    first = data[0]
    version = (first >> 3) & 7
    if not 1 <= version <= 4:
        return Reason.MALFORMED
    mode = first & 7
    drop = _MODE_DROP[mode]
    if mode == Mode.RESERVED and version == 1 and source_port != NTP_PORT:
        drop = None  # an NTPv1 client request (NTPv1 had no mode field)
    elif mode == Mode.SYMMETRIC_ACTIVE and not answer_symmetric:
        drop = Reason.SYMMETRIC_DISABLED
    if drop is not None:
        return drop
    reply_mode = _REPLY_MODE[Mode(mode)]
    if length == HEADER_LEN:
        return Request(version, reply_mode)
    try:
        tail = parse_tail(data, version)
    except MalformedPacket:
        return Reason.MALFORMED
    if tail.kind is TailKind.CRYPTO_NAK:
        return Reason.CRYPTO_NAK
    whole_tail_mac = None
    if tail.kind is TailKind.EXTENSIONS and MAX_V4_BARE_MAC_LEN < length - HEADER_LEN \
            <= MAX_MAC_LEN:
        whole_tail_mac = Request(version, reply_mode, int.from_bytes(data[48:52], "big"),
                                 HEADER_LEN, length - HEADER_LEN)
    if tail.mac is not None:
        return Request(version, reply_mode, tail.mac.key_id, tail.mac.offset,
                       length - tail.mac.offset, whole_tail_mac)
    # Unknown extension fields are ignored (RFC 7822 §3); the reply carries none.
    return Request(version, reply_mode, whole_tail_mac=whole_tail_mac)


class Responder:
    """Builds reply bytes from a cached clock snapshot.

    The header bytes that depend only on the clock are precomputed by
    :meth:`set_clock`, so a time reply is one concatenation of five pieces.
    """

    __slots__ = ("clock", "offset_ns", "_prefix", "_fields", "_precision", "wire_snapshot")

    def __init__(self, clock: ClockState, now_ns: int) -> None:
        self.set_clock(clock, now_ns)

    def set_clock(self, clock: ClockState, now_ns: int) -> None:
        """Take a new snapshot; call again at least every second (dispersion grows)."""
        self.clock = clock
        self.offset_ns = clock.offset_ns
        lvm_base = int(clock.wire_leap) << 6
        stratum = clock.wire_stratum
        # _prefix[version][reply_mode] -> the first two bytes (LI|VN|mode, stratum)
        self._prefix = [
            {mode: bytes(((lvm_base | (version << 3) | mode), stratum)) for mode in (2, 4)}
            for version in range(8)
        ]
        self._precision = (clock.precision & 0xFF).to_bytes(1, "big")
        self._fields = self._precision + clock.reply_fields(now_ns)
        #: What the compiled packet loop (``fastlane``) builds a time reply from:
        #: (the first two bytes for version v and reply mode m at ``(v * 8 + m) * 2``,
        #: bytes 3-23 of the reply, the source offset in ns). Replaced, never mutated.
        heads = bytearray(128)
        for version in range(8):
            for mode, head in self._prefix[version].items():
                heads[(version * 8 + mode) * 2:(version * 8 + mode) * 2 + 2] = head
        self.wire_snapshot = (bytes(heads), self._fields, self.offset_ns)

    def served_ntp(self, system_ns: int) -> int:
        """The NTP timestamp served for a system-clock reading (applies the source offset)."""
        return unix_ns_to_ntp(system_ns + self.offset_ns)

    def time_reply_at(self, data: bytes, request: Request, receive_ns: int) -> bytes:
        """``time_reply(data, request, served_ntp(receive_ns))`` in one step: the hot path.

        ``(ns << 32) // 10**9`` is seconds << 32 plus the fraction exactly (the
        seconds part is a whole multiple), so one division replaces a divmod.
        """
        receive = ((((receive_ns + self.offset_ns) << 32) // NS_PER_S + _UNIX_EPOCH_NTP)
                   & TS_MASK)
        return _TIME_REPLY.pack(self._prefix[request.version][request.reply_mode], data[2],
                                self._fields, data[40:48], receive, receive)

    def time_reply(self, data: bytes, request: Request, receive_ts: int,
                   transmit_ts: int | None = None) -> bytes:
        """A 48-byte time reply. Without ``transmit_ts`` the transmit field holds the
        receive timestamp until the socket loop stamps it just before sending."""
        receive = receive_ts.to_bytes(8, "big")
        transmit = receive if transmit_ts is None else transmit_ts.to_bytes(8, "big")
        return (self._prefix[request.version][request.reply_mode] + data[2:3] + self._fields
                + data[40:48] + receive + transmit)

    def kod_reply(self, data: bytes, request: Request, code: bytes, min_poll: int) -> bytes:
        """A Kiss-o'-Death reply in ntpd's layout, revealing no server time.

        org = rec = xmt = the client's transmit timestamp (so the client's origin
        check passes, RFC 5905 §8 / chrony ``test2``), stratum 0, LI=3, refid =
        the kiss code, root delay/dispersion and reference timestamp zero, and
        poll = max(request poll, ``min_poll``).
        """
        poll = max(_int8(data[2]), min_poll)
        lvm = (3 << 6) | (request.version << 3) | request.reply_mode
        xmt = data[40:48]
        return (bytes((lvm, 0, poll & 0xFF)) + self._precision + bytes(8) + code[:4]
                + bytes(8) + xmt + xmt + xmt)


def _int8(byte: int) -> int:
    return byte - 256 if byte > 127 else byte
