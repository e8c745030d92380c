"""NTPv4 extension fields for NTS (RFC 8915 §5, RFC 7822) (pure).

An extension field is ``type (16) | length (16) | body``, ``length`` counting the
4-byte header, a multiple of 4 and at least 16 (RFC 7822 §7.5, what chrony
enforces). The NTS fields:

=========  ======================================================
``0x0104``  Unique Identifier: at least 32 random bytes, echoed in the reply
``0x0204``  NTS Cookie: an opaque cookie from NTS-KE or a previous reply
``0x0304``  NTS Cookie Placeholder: as long as a cookie, asks for one more
``0x0404``  NTS Authenticator and Encrypted Extension Fields
=========  ======================================================

The authenticator's body is ``nonce length (16) | ciphertext length (16) | nonce,
padded to 4 | ciphertext, padded to 4 | optional padding``; its associated data is
the packet from its first byte up to the authenticator field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_LEN = 48
UNIQUE_IDENTIFIER = 0x0104
NTS_COOKIE = 0x0204
COOKIE_PLACEHOLDER = 0x0304
NTS_AUTHENTICATOR = 0x0404
#: RFC 7822 §7.5 / chrony ``NTP_MIN_EF_LENGTH``.
MIN_FIELD_LEN = 16
#: RFC 8915 §5.3: at least 32 bytes of unique identifier.
MIN_UNIQUE_ID_LEN = 32
#: RFC 8915 §5.6 / chrony: a nonce of at least 16 bytes.
MIN_NONCE_LEN = 16


class MalformedField(ValueError):
    """Bytes that are not a clean run of extension fields; ``reason`` is a counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Field:
    """One extension field: ``offset`` of its header in the packet, ``body`` without padding
    removed (NTS bodies carry their own lengths where it matters)."""

    type: int
    offset: int
    length: int
    body: bytes


def pad4(n: int) -> int:
    return (n + 3) & ~3


def encode_field(ef_type: int, body: bytes, min_length: int = MIN_FIELD_LEN) -> bytes:
    """``body`` as an extension field, zero-padded to a multiple of 4 and ``min_length``."""
    length = max(pad4(4 + len(body)), min_length)
    return struct.pack("!HH", ef_type, length) + body + bytes(length - 4 - len(body))


def parse_fields(data: bytes, start: int = 0) -> list[Field]:
    """Every field of ``data[start:]``, which must be a clean run of fields; else
    :class:`MalformedField`. Bounded: each field is at least 16 bytes."""
    fields: list[Field] = []
    offset = start
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise MalformedField("ef_truncated")
        ef_type, length = struct.unpack_from("!HH", data, offset)
        if length < MIN_FIELD_LEN or length % 4 or offset + length > end:
            raise MalformedField("ef_bad_length")
        fields.append(Field(ef_type, offset, length, data[offset + 4:offset + length]))
        offset += length
    return fields


def has_unique_identifier(packet: bytes) -> bool:
    """True when the NTPv4 packet's extension fields include an NTS Unique Identifier:
    the cheap test of "is this an NTS request". chrony and NTPsec put the identifier
    first, so ``packet[48:50] == b"\\x01\\x04"`` answers most packets at once; otherwise
    the field headers are walked (at most ``(len - 48) / 16`` steps, no allocation)."""
    end = len(packet)
    if end < HEADER_LEN + MIN_FIELD_LEN or (packet[0] >> 3) & 7 != 4:
        return False
    offset = HEADER_LEN
    while end - offset >= 4:
        ef_type = (packet[offset] << 8) | packet[offset + 1]
        length = (packet[offset + 2] << 8) | packet[offset + 3]
        if ef_type == UNIQUE_IDENTIFIER:
            return True
        if length < MIN_FIELD_LEN or length % 4:
            return False
        offset += length
    return False


@dataclass(frozen=True, slots=True)
class Authenticator:
    nonce: bytes
    ciphertext: bytes


def parse_authenticator(body: bytes) -> Authenticator:
    """The nonce and ciphertext of an NTS Authenticator body; :class:`MalformedField` if the
    lengths do not fit the body or the nonce is shorter than 16 bytes."""
    if len(body) < 4:
        raise MalformedField("auth_malformed")
    nonce_len, ct_len = struct.unpack_from("!HH", body)
    if nonce_len < MIN_NONCE_LEN:
        raise MalformedField("auth_short_nonce")
    ct_start = 4 + pad4(nonce_len)
    if ct_start + pad4(ct_len) > len(body):
        raise MalformedField("auth_malformed")
    return Authenticator(body[4:4 + nonce_len], body[ct_start:ct_start + ct_len])


def authenticator_length(nonce_len: int, ciphertext_len: int) -> int:
    """Length of the authenticator field (header included) before any extra padding."""
    return 4 + 4 + pad4(nonce_len) + pad4(ciphertext_len)


def encode_authenticator(nonce: bytes, ciphertext: bytes, total_length: int = 0) -> bytes:
    """The authenticator field, padded with zeros to ``total_length`` when that is longer
    (chrony makes its reply exactly as long as the request that way)."""
    length = max(authenticator_length(len(nonce), len(ciphertext)), total_length,
                 MIN_FIELD_LEN)
    body = (struct.pack("!HH", len(nonce), len(ciphertext))
            + nonce + bytes(pad4(len(nonce)) - len(nonce))
            + ciphertext + bytes(pad4(len(ciphertext)) - len(ciphertext)))
    return struct.pack("!HH", NTS_AUTHENTICATOR, length) + body + bytes(length - 4 - len(body))
