"""Classic pcap files, and Ethernet / IPv4 / IPv6 / UDP frames, as raw bytes.

Rule: no scapy here. Scapy builds one template frame per packet kind (``capture``);
this module copies and patches it (source address, source port, IPv4 TTL or IPv6
hop limit, NTP transmit timestamp, both checksums) and reads frames back, at a few
microseconds a packet.
Files are libpcap's classic format (what Wireshark and tcpreplay read everywhere),
microsecond timestamps, link type Ethernet: on ``lo`` that means zero MACs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from ..timestamps import NS_PER_S

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
SNAPLEN = 65535
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
IPPROTO_UDP = 17

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_READ_CHUNK = 1 << 22


class PcapError(Exception):
    """A file is not a capture this harness can read; the message is one line."""


# ---------------------------------------------------------------------- writing

class PcapWriter:
    """Writes records to an open binary file, buffering a few thousand at a time."""

    def __init__(self, file: BinaryIO, linktype: int = LINKTYPE_ETHERNET) -> None:
        self.file = file
        self.buffer: list[bytes] = []
        self.packets = 0
        file.write(_GLOBAL.pack(MAGIC_US, 2, 4, 0, 0, SNAPLEN, linktype))

    def write(self, t_ns: int, frame: bytes) -> None:
        seconds, ns = divmod(t_ns, NS_PER_S)
        self.buffer.append(_RECORD.pack(seconds, ns // 1000, len(frame), len(frame)) + frame)
        self.packets += 1
        if len(self.buffer) >= 8192:
            self.flush()

    def flush(self) -> None:
        self.file.write(b"".join(self.buffer))
        self.buffer.clear()


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def word_sum(data: bytes) -> int:
    """Sum of big-endian 16-bit words (unfolded), the raw material of an Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f">{len(data) // 2}H", data))


class FrameTemplate:
    """A complete Ethernet frame whose source address, source port and (if ``patch_xmt``)
    NTP transmit timestamp are zero; :meth:`build` fills them in, sets the TTL (IPv4) or
    hop limit (IPv6), and fixes the checksums incrementally (RFC 1624: a ones'-complement
    sum does not care about order). The UDP checksum's pseudo-header does not cover the
    TTL; the IPv4 header checksum does."""

    __slots__ = ("frame", "v4", "patch_xmt", "ip_csum_at", "src_at", "src_len", "l4_at",
                 "ttl_at", "ip_sum", "udp_sum")

    def __init__(self, frame: bytes, patch_xmt: bool) -> None:
        self.frame = frame
        self.patch_xmt = patch_xmt
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == ETHERTYPE_IPV4:
            self.v4 = True
            ihl = (frame[14] & 0x0F) * 4
            self.ip_csum_at, self.src_at, self.src_len, self.l4_at = 24, 26, 4, 14 + ihl
            self.ttl_at = 22
            # The header's sum without the template's TTL (the high byte of word 4):
            # subtracting is adding the ones' complement.
            self.ip_sum = _fold((~int.from_bytes(frame[24:26], "big") & 0xFFFF)
                                + (~(frame[22] << 8) & 0xFFFF))
        elif ethertype == ETHERTYPE_IPV6:
            self.v4 = False
            self.ip_csum_at, self.src_at, self.src_len, self.l4_at = 0, 22, 16, 54
            self.ttl_at = 21
            self.ip_sum = 0
        else:
            raise ValueError(f"template ethertype {ethertype:#06x} is neither IPv4 nor IPv6")
        l4 = self.l4_at
        if any(frame[self.src_at:self.src_at + self.src_len]) or any(frame[l4:l4 + 2]):
            raise ValueError("template source address and port must be zero")
        if patch_xmt and any(frame[l4 + 48:l4 + 56]):
            raise ValueError("template transmit timestamp must be zero")
        self.udp_sum = ~int.from_bytes(frame[l4 + 6:l4 + 8], "big") & 0xFFFF

    def build(self, src: bytes, src_sum: int, port: int, xmt: int, ttl: int) -> bytes:
        """The frame from ``src`` (whose :func:`word_sum` is ``src_sum``), ``port``, ``xmt``,
        arriving with TTL / hop limit ``ttl`` (0-255)."""
        frame = bytearray(self.frame)
        if self.v4:
            frame[24:26] = (~_fold(self.ip_sum + src_sum + (ttl << 8)) & 0xFFFF).to_bytes(
                2, "big")
        frame[self.ttl_at] = ttl
        frame[self.src_at:self.src_at + self.src_len] = src
        l4 = self.l4_at
        frame[l4:l4 + 2] = port.to_bytes(2, "big")
        udp = self.udp_sum + src_sum + port
        if self.patch_xmt:
            frame[l4 + 48:l4 + 56] = xmt.to_bytes(8, "big")
            udp += (xmt >> 48) + ((xmt >> 32) & 0xFFFF) + ((xmt >> 16) & 0xFFFF) + (xmt & 0xFFFF)
        checksum = ~_fold(udp) & 0xFFFF
        frame[l4 + 6:l4 + 8] = (checksum or 0xFFFF).to_bytes(2, "big")
        return bytes(frame)


# ---------------------------------------------------------------------- reading

def read_frames(path: str) -> Iterator[tuple[int, bytes]]:
    """(timestamp ns, frame) for each record, after checking the header. Raises PcapError."""
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed in the finally below, across yields
    except OSError as error:
        raise PcapError(f"{path}: cannot read: {error.strerror}") from None
    try:
        header = file.read(_GLOBAL.size)
        if len(header) < _GLOBAL.size:
            raise PcapError(f"{path}: not a pcap file (too short)")
        magic = int.from_bytes(header[:4], "little")
        if magic in (MAGIC_US, MAGIC_NS):
            order = "<"
        elif int.from_bytes(header[:4], "big") in (MAGIC_US, MAGIC_NS):
            order, magic = ">", int.from_bytes(header[:4], "big")
        else:
            raise PcapError(f"{path}: not a classic pcap file (pcapng? convert it with "
                            "`editcap -F pcap IN OUT`)")
        linktype = struct.unpack(order + "I", header[20:24])[0] & 0x0FFF_FFFF
        if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_RAW):
            raise PcapError(f"{path}: link type {linktype} not supported (Ethernet or raw IP)")
        sub_ns = 1 if magic == MAGIC_NS else 1000
        record = struct.Struct(order + "IIII")
        buffer = b""
        offset = 0
        while True:
            if len(buffer) - offset < record.size:
                buffer = buffer[offset:] + file.read(_READ_CHUNK)
                offset = 0
                if len(buffer) < record.size:
                    if buffer:
                        raise PcapError(f"{path}: truncated record header at the end")
                    return
            seconds, sub, caplen, _ = record.unpack_from(buffer, offset)
            start = offset + record.size
            if len(buffer) - start < caplen:
                buffer = buffer[offset:] + file.read(max(_READ_CHUNK, caplen))
                offset = 0
                start = record.size
                if len(buffer) - start < caplen:
                    raise PcapError(f"{path}: truncated packet at the end")
            frame = buffer[start:start + caplen]
            offset = start + caplen
            if linktype == LINKTYPE_RAW:
                version = frame[0] >> 4 if frame else 0
                ethertype = ETHERTYPE_IPV6 if version == 6 else ETHERTYPE_IPV4
                frame = bytes(12) + ethertype.to_bytes(2, "big") + frame
            yield seconds * NS_PER_S + sub * sub_ns, frame
    finally:
        file.close()


#: (source packed, source port, destination packed, destination port, UDP payload,
#: IPv4 TTL or IPv6 hop limit)
Datagram = tuple[bytes, int, bytes, int, bytes, int]


def parse_udp(frame: bytes) -> Datagram | None:
    """The UDP datagram in an Ethernet frame, or None (not UDP, a later fragment, cut short),
    with the TTL (IPv4) or hop limit (IPv6) it arrived with."""
    at = 14
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETHERTYPE_VLAN:
        ethertype = int.from_bytes(frame[16:18], "big")
        at = 18
    if ethertype == ETHERTYPE_IPV4:
        if len(frame) < at + 20 or frame[at + 9] != IPPROTO_UDP:
            return None
        if int.from_bytes(frame[at + 6:at + 8], "big") & 0x1FFF:
            return None  # not the first fragment
        src, dst = frame[at + 12:at + 16], frame[at + 16:at + 20]
        ttl = frame[at + 8]
        at += (frame[at] & 0x0F) * 4
    elif ethertype == ETHERTYPE_IPV6:
        if len(frame) < at + 40 or frame[at + 6] != IPPROTO_UDP:
            return None
        src, dst = frame[at + 8:at + 24], frame[at + 24:at + 40]
        ttl = frame[at + 7]
        at += 40
    else:
        return None
    if len(frame) < at + 8:
        return None
    length = int.from_bytes(frame[at + 4:at + 6], "big")
    payload = frame[at + 8:at + max(8, length)]
    return (src, int.from_bytes(frame[at:at + 2], "big"), dst,
            int.from_bytes(frame[at + 2:at + 4], "big"), payload, ttl)
