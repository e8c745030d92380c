"""The client side of NTS-protected NTPv4 (RFC 8915 §5) (pure).

What ``guardntp query --nts`` and the tests need: :func:`build_request` makes the
extension fields of a request (Unique Identifier, one cookie, placeholders, an
authenticator under C2S), :func:`check_reply` verifies a reply under S2C and
returns the fresh cookies, and :func:`is_nts_nak` recognises an NTS NAK.
:class:`NtsSession` holds the keys and cookies of one NTS-KE and makes
:class:`guardntp.client.Request` objects for :func:`guardntp.client.exchange_request`
(randomness injected, so it stays pure).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .. import client
from ..wire import MalformedPacket, Mode, parse
from . import aead
from .extensions import (
    COOKIE_PLACEHOLDER,
    HEADER_LEN,
    NTS_AUTHENTICATOR,
    NTS_COOKIE,
    UNIQUE_IDENTIFIER,
    MalformedField,
    encode_authenticator,
    encode_field,
    parse_authenticator,
    parse_fields,
)


class NtsReplyError(ValueError):
    """A reply that is not an authentic answer to our request; one line why."""


def build_request(header: bytes, cookie: bytes, c2s: bytes, unique_id: bytes, nonce: bytes,
                  placeholders: int = 0) -> bytes:
    """The whole request: ``header`` (48 bytes, mode 3 v4), then the NTS fields."""
    if len(header) != HEADER_LEN:
        raise ValueError("an NTP header is 48 bytes")
    body = (header + encode_field(UNIQUE_IDENTIFIER, unique_id)
            + encode_field(NTS_COOKIE, cookie)
            + b"".join(encode_field(COOKIE_PLACEHOLDER, bytes(len(cookie)))
                       for _ in range(placeholders)))
    return body + encode_authenticator(nonce, aead.seal(c2s, b"", body, nonce))


@dataclass(frozen=True, slots=True)
class NtsReply:
    cookies: tuple[bytes, ...]


def check_reply(reply: bytes, s2c: bytes, unique_id: bytes) -> NtsReply:
    """The cookies of an authentic reply whose Unique Identifier is ``unique_id``; else
    :class:`NtsReplyError`."""
    try:
        fields = parse_fields(reply, HEADER_LEN)
    except MalformedField as error:
        raise NtsReplyError(f"reply extension fields are malformed ({error.reason})") from None
    uid = next((ef for ef in fields if ef.type == UNIQUE_IDENTIFIER), None)
    if uid is None or uid.body[:len(unique_id)] != unique_id:
        raise NtsReplyError("reply does not echo our NTS unique identifier")
    auth = next((ef for ef in fields if ef.type == NTS_AUTHENTICATOR), None)
    if auth is None:
        raise NtsReplyError("reply has no NTS authenticator")
    try:
        authenticator = parse_authenticator(auth.body)
    except MalformedField as error:
        raise NtsReplyError(f"reply authenticator is malformed ({error.reason})") from None
    plaintext = aead.open_sealed(s2c, authenticator.ciphertext, reply[:auth.offset],
                                 authenticator.nonce)
    if plaintext is None:
        raise NtsReplyError("reply authenticator does not verify under the S2C key")
    try:
        inner = parse_fields(plaintext)
    except MalformedField:
        raise NtsReplyError("reply's encrypted fields are malformed") from None
    return NtsReply(tuple(ef.body for ef in inner if ef.type == NTS_COOKIE))


def is_nts_nak(reply: bytes, unique_id: bytes) -> bool:
    """A Kiss-o'-Death NTSN (stratum 0) that echoes ``unique_id``."""
    if len(reply) < HEADER_LEN or reply[1] != 0 or reply[12:16] != b"NTSN":
        return False
    try:
        fields = parse_fields(reply, HEADER_LEN)
    except MalformedField:
        return False
    return any(ef.type == UNIQUE_IDENTIFIER and ef.body[:len(unique_id)] == unique_id
               for ef in fields)


def request_header(transmit: int) -> bytes:
    """A minimal NTPv4 client header with ``transmit`` (a 64-bit NTP timestamp)."""
    return struct.pack("!B7x32xQ", 0x23, transmit)


#: Cookies a session tries to hold (what NTS-KE gives, RFC 8915 §4.1.6): each request
#: spends one and asks with placeholders for as many as it takes to get back there.
TARGET_COOKIES = 8
#: RFC 8915 §5.7: at least 32 bytes; a nonce of 16 (chrony's choice).
UNIQUE_ID_LEN = 32
NONCE_LEN = 16


@dataclass(slots=True)
class NtsSession:
    """The keys and cookie pool of one NTS-KE; :meth:`request` spends one cookie per
    exchange, and every authentic reply puts its fresh cookies back.

    ``cookies_from_replies`` counts the cookies replies brought (for the report)."""

    c2s: bytes
    s2c: bytes
    cookies: list[bytes]
    random_bytes: Callable[[int], bytes] = secrets.token_bytes
    cookies_from_replies: int = 0

    def request(self, transmit: int) -> client.Request | None:
        """An NTS request with the random ``transmit`` field, or None without a cookie.

        Its ``verify`` raises :class:`~guardntp.client.KissOfDeath` ``NTSN`` for an NTS
        NAK echoing our Unique Identifier, :class:`~guardntp.client.BogusReply` for a
        reply that is not an authentic answer, and returns the header of one that is."""
        if not self.cookies:
            return None
        cookie = self.cookies.pop(0)
        placeholders = max(0, TARGET_COOKIES - len(self.cookies) - 1)
        pending = client.build_request(transmit, 4, Mode.CLIENT)
        unique_id = self.random_bytes(UNIQUE_ID_LEN)
        wire = build_request(pending.wire, cookie, self.c2s, unique_id,
                             self.random_bytes(NONCE_LEN), placeholders)

        def verify(reply: bytes) -> bytes:
            try:
                packet = parse(reply)
            except MalformedPacket as error:  # the stray test parsed it already
                raise client.BogusReply(f"malformed reply ({error})") from None
            if is_nts_nak(reply, unique_id):
                raise client.KissOfDeath("NTSN", packet)
            if len(reply) == HEADER_LEN:
                raise client.BogusReply("reply is not NTS-authenticated (no extension "
                                        "fields)", packet)
            try:
                checked = check_reply(reply, self.s2c, unique_id)
            except NtsReplyError as error:
                raise client.BogusReply(f"NTS: {error}", packet) from None
            fresh = [cookie for cookie in checked.cookies if cookie]
            self.cookies_from_replies += len(fresh)
            self.cookies.extend(fresh[:max(0, TARGET_COOKIES - len(self.cookies))])
            return reply[:HEADER_LEN]

        return client.Request(pending, wire, verify)
