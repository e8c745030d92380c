"""NTP wire format, versions 1-4: parse and encode, nothing else.

Rule: this module does no I/O and reads no clock. Hostile input either parses
into an :class:`NtpPacket` or raises :class:`MalformedPacket` (a ``ValueError``)
with a short machine-readable ``reason`` that the server counts.

Unknown enum values never raise: all eight modes and four leap values are named,
and an unknown kiss code is kept as its four ASCII characters.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import struct
from dataclasses import dataclass, field

HEADER_LEN = 48
_HEADER = struct.Struct("!BBbbII4sQQQQ")

#: RFC 7822 §7.5: an extension field is at least 16 bytes (4 header + 12 value).
MIN_EXT_FIELD_LEN = 16
#: A MAC is a 4-byte key id plus a digest of 16 (MD5, AES-CMAC) to 64 bytes
#: (chrony's NTP_MAX_MAC_LENGTH = 4 + 64).
MIN_MAC_LEN = 4 + 16
MAX_MAC_LEN = 4 + 64
#: RFC 7822 §7.5 / chrony: an NTPv4 tail of 20-24 bytes with no extension field
#: is a MAC (MD5/CMAC 16 B or SHA1/truncated SHA256 20 B digests).
MAX_V4_BARE_MAC_LEN = 4 + 20
#: RFC 5905 §7.4: a 4-byte all-zero tail is a crypto-NAK.
CRYPTO_NAK_LEN = 4


class Mode(enum.IntEnum):
    """RFC 5905 §7.3 association modes (all eight values are named)."""

    RESERVED = 0
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5
    CONTROL = 6
    PRIVATE = 7


class Leap(enum.IntEnum):
    """RFC 5905 §7.3 leap indicator."""

    NONE = 0
    INSERT_SECOND = 1
    DELETE_SECOND = 2
    UNSYNCHRONIZED = 3


#: Kiss codes a server may send or a client must understand (RFC 5905 §7.4).
KISS_CODES = {
    "RATE": "rate exceeded: the server asks the client to poll less often",
    "DENY": "access denied by the server",
    "RSTR": "access denied due to local policy",
    "CRYP": "cryptographic authentication or identification failed",
    "AUTH": "server authentication failed",
    "AUTO": "autokey sequence failed",
    "BCST": "the association belongs to a broadcast server",
    "DROP": "lost peer in symmetric mode",
    "INIT": "the association has not yet synchronized for the first time",
    "MCST": "the association belongs to a dynamically discovered server",
    "NKEY": "no key found",
    "NTSN": "network time security negative acknowledgement",
    "RMOT": "alteration of association from a remote host",
    "STEP": "a step change in system time has occurred",
}

#: RFC 5905 stratum of a server that is not synchronised; sent on the wire as 0.
STRATUM_UNSPECIFIED = 16


class MalformedPacket(ValueError):
    """The bytes are not an NTP packet this server will look at.

    ``reason`` is a short token ("short", "unaligned", "version", "ext_field",
    "mac_length") suitable as a counter label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TailKind(enum.Enum):
    """What follows the 48-byte header, classified as chrony 4.3 ``parse_packet`` does."""

    NONE = "none"
    MAC = "mac"
    CRYPTO_NAK = "crypto_nak"
    EXTENSIONS = "extensions"


@dataclass(frozen=True, slots=True)
class ExtensionField:
    field_type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Mac:
    """A symmetric-key MAC: key id and digest; ``offset`` is where it starts in the packet."""

    key_id: int
    digest: bytes
    offset: int


@dataclass(frozen=True, slots=True)
class Tail:
    kind: TailKind = TailKind.NONE
    extension_fields: tuple[ExtensionField, ...] = ()
    mac: Mac | None = None


@dataclass(frozen=True, slots=True)
class NtpPacket:
    """One NTP packet. Timestamps are 64-bit ints, root delay/dispersion 16.16 ints."""

    leap: Leap = Leap.NONE
    version: int = 4
    mode: Mode = Mode.CLIENT
    stratum: int = 0
    poll: int = 0
    precision: int = 0
    root_delay: int = 0
    root_dispersion: int = 0
    refid: bytes = b"\0\0\0\0"
    reference_ts: int = 0
    origin_ts: int = 0
    receive_ts: int = 0
    transmit_ts: int = 0
    tail: Tail = field(default_factory=Tail)

    @property
    def is_kiss_of_death(self) -> bool:
        """RFC 5905 §7.4: stratum 0 replies carry a kiss code in the refid."""
        return self.stratum == 0 and self.mode in (Mode.SERVER, Mode.SYMMETRIC_PASSIVE)

    @property
    def kiss_code(self) -> str:
        """The refid as ASCII (printable characters only), for stratum-0 packets."""
        return "".join(chr(b) if 32 < b < 127 else "?" for b in self.refid).rstrip("?")


def parse(data: bytes) -> NtpPacket:
    """Parse a packet of any version 1-4. Raises :class:`MalformedPacket`."""
    length = len(data)
    if length < HEADER_LEN:
        raise MalformedPacket("short", f"{length} bytes")
    if length % 4:
        raise MalformedPacket("unaligned", f"{length} bytes is not a multiple of 4")
    (lvm, stratum, poll, precision, root_delay, root_disp, refid,
     ref_ts, org_ts, rec_ts, xmt_ts) = _HEADER.unpack_from(data)
    version = (lvm >> 3) & 7
    if not 1 <= version <= 4:
        raise MalformedPacket("version", f"version {version}")
    return NtpPacket(
        leap=Leap(lvm >> 6),
        version=version,
        mode=Mode(lvm & 7),
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay=root_delay,
        root_dispersion=root_disp,
        refid=refid,
        reference_ts=ref_ts,
        origin_ts=org_ts,
        receive_ts=rec_ts,
        transmit_ts=xmt_ts,
        tail=parse_tail(data, version),
    )


def parse_tail(data: bytes, version: int) -> Tail:
    """Classify the bytes after the header (chrony 4.3 ``parse_packet`` rules)."""
    length = len(data)
    remainder = length - HEADER_LEN
    if remainder == 0:
        return Tail()
    if version != 4:
        # v1-v3 have no extension fields: everything after the header is a MAC
        # (a 20-byte all-zero one is MS-SNTP's, which we treat like any MAC).
        if not 4 <= remainder <= MAX_MAC_LEN:
            raise MalformedPacket("mac_length", f"{remainder}-byte MAC")
        return Tail(TailKind.MAC, mac=_mac_at(data, HEADER_LEN))
    if remainder == CRYPTO_NAK_LEN and data[HEADER_LEN:] == b"\0\0\0\0":
        return Tail(TailKind.CRYPTO_NAK)
    if MAX_V4_BARE_MAC_LEN < remainder <= MAX_MAC_LEN:
        # Old chrony clients (and NTPsec's ntpdig) send long MACs in NTPv4 packets:
        # a tail of 25-68 bytes that is not a clean run of extension fields is one.
        try:
            return _parse_extension_fields(data)
        except MalformedPacket:
            return Tail(TailKind.MAC, mac=_mac_at(data, HEADER_LEN))
    return _parse_extension_fields(data)


def _parse_extension_fields(data: bytes) -> Tail:
    """RFC 7822 fields from byte 48, then an optional MAC of 20-24 bytes."""
    length = len(data)
    fields: list[ExtensionField] = []
    offset = HEADER_LEN
    while offset < length:
        if MIN_MAC_LEN <= length - offset <= MAX_V4_BARE_MAC_LEN:
            break  # the rest is a MAC (RFC 7822 §7.5 deterministic parsing)
        if not _is_ext_field(data, offset):
            raise MalformedPacket("ext_field", f"bad extension field at byte {offset}")
        field_type, field_len = struct.unpack_from("!HH", data, offset)
        fields.append(ExtensionField(field_type, bytes(data[offset + 4 : offset + field_len])))
        offset += field_len
    mac = _mac_at(data, offset) if offset < length else None
    return Tail(TailKind.EXTENSIONS if fields else TailKind.MAC, tuple(fields), mac)


def _is_ext_field(data: bytes, offset: int) -> bool:
    if len(data) - offset < MIN_EXT_FIELD_LEN:
        return False
    field_len = int.from_bytes(data[offset + 2 : offset + 4], "big")
    return field_len >= MIN_EXT_FIELD_LEN and field_len % 4 == 0 and offset + field_len <= len(data)


def _mac_at(data: bytes, offset: int) -> Mac:
    key_id = int.from_bytes(data[offset : offset + 4], "big")
    return Mac(key_id, bytes(data[offset + 4 :]), offset)


def encode(packet: NtpPacket) -> bytes:
    """Encode the 48-byte header plus any extension fields (a MAC is added by the signer)."""
    lvm = (int(packet.leap) << 6) | ((packet.version & 7) << 3) | (int(packet.mode) & 7)
    header = _HEADER.pack(
        lvm, packet.stratum & 0xFF, _int8(packet.poll), _int8(packet.precision),
        packet.root_delay & 0xFFFF_FFFF, packet.root_dispersion & 0xFFFF_FFFF,
        packet.refid[:4].ljust(4, b"\0"), packet.reference_ts, packet.origin_ts,
        packet.receive_ts, packet.transmit_ts,
    )
    extensions = b"".join(
        struct.pack("!HH", ef.field_type, 4 + len(ef.value)) + ef.value
        for ef in packet.tail.extension_fields
    )
    return header + extensions


def _int8(value: int) -> int:
    return max(-128, min(127, value))


def refid_from_ipv4(address: str) -> bytes:
    """RFC 5905 §7.3: above stratum 1 the refid is the upstream's IPv4 address."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ip.packed
    # RFC 5905: for IPv6 upstreams, the first four octets of the MD5 of the address.
    return hashlib.md5(ip.packed, usedforsecurity=False).digest()[:4]


def refid_bytes(text: str) -> bytes:
    """An IPv4 address, or up to four ASCII characters (a stratum-1 reference id);
    ValueError for anything else (``clock.refid`` is checked with this)."""
    if not text:
        return b"\0\0\0\0"
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        if len(text) > 4 or not text.isascii():
            raise ValueError(f"refid {text!r}: an IPv4 address or up to 4 ASCII letters") \
                from None
        return text.encode().ljust(4, b"\0")


def refid_to_text(refid: bytes, stratum: int) -> str:
    """Human form: ASCII for stratum 0/1 (kiss code or reference id), dotted quad otherwise."""
    if stratum <= 1:
        return "".join(chr(b) for b in refid if 32 < b < 127)
    return ".".join(str(b) for b in refid)
