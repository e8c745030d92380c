"""NTS-protected NTPv4 on the server side (RFC 8915 §5) (pure).

:func:`answer` takes an NTPv4 client request (48-byte header plus extension fields)
and the master keys in force, and ends in exactly one :class:`NtsReason`:

* ``ANSWERED``: the cookie opened and the authenticator verified under C2S. The
  verdict's :meth:`NtsVerdict.extensions` takes the final 48-byte reply header
  (transmit timestamp included, since it is authenticated) and returns the
  extension fields to append: the Unique Identifier echoed, then an authenticator
  under S2C whose encrypted fields are fresh cookies, one per cookie and
  placeholder received (at most 8). The whole reply is exactly as long as the
  request (padding, as chrony does), never longer: when the cookies asked for
  do not fit (placeholders shorter than cookies), fewer are sent.
* a ``NAK_*`` reason: the cookie did not open (expired key, tampered, foreign).
  :meth:`NtsVerdict.extensions` returns the Unique Identifier field alone, to be
  appended to a Kiss-o'-Death header with kiss code ``NTSN`` (stratum 0).
* a ``DROP_*`` reason: anything malformed, or an authenticator that does not
  verify (no reply: an NAK would let anyone probe with forged packets).

Nothing here reads a clock, a socket or a file; randomness (reply nonce, cookie
nonces) comes from the ``random_bytes`` argument.
"""

from __future__ import annotations

import enum
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import aead
from .cookies import (
    CookieContents,
    CookieRejected,
    MasterKeys,
    cookie_length,
    make_cookie,
    open_cookie,
)
from .extensions import (
    COOKIE_PLACEHOLDER,
    HEADER_LEN,
    MIN_UNIQUE_ID_LEN,
    NTS_AUTHENTICATOR,
    NTS_COOKIE,
    UNIQUE_IDENTIFIER,
    MalformedField,
    authenticator_length,
    encode_authenticator,
    encode_field,
    parse_authenticator,
    parse_fields,
)

#: RFC 8915 §5.7 / chrony NTS_MAX_COOKIES.
MAX_COOKIES = 8
REPLY_NONCE_LEN = 16


class NtsOutcome(enum.Enum):
    REPLY = "reply"
    NAK = "nak"
    DROP = "drop"


class NtsReason(enum.Enum):
    """Every way an NTS request ends; the value is the counter name."""

    ANSWERED = "nts_answered"
    NAK_COOKIE_MALFORMED = "nts_nak_cookie_malformed"
    NAK_COOKIE_UNKNOWN_KEY = "nts_nak_cookie_unknown_key"
    NAK_COOKIE_INVALID = "nts_nak_cookie_invalid"
    DROP_SHORT = "nts_drop_short"
    DROP_NOT_V4_CLIENT = "nts_drop_not_v4_client"
    DROP_MALFORMED_FIELDS = "nts_drop_malformed_fields"
    DROP_NO_UNIQUE_ID = "nts_drop_no_unique_id"
    DROP_SHORT_UNIQUE_ID = "nts_drop_short_unique_id"
    DROP_NO_COOKIE = "nts_drop_no_cookie"
    DROP_DUPLICATE_FIELD = "nts_drop_duplicate_field"
    DROP_COOKIE_LENGTHS = "nts_drop_cookie_placeholder_lengths"
    DROP_NO_AUTHENTICATOR = "nts_drop_no_authenticator"
    DROP_AUTHENTICATOR_NOT_LAST = "nts_drop_authenticator_not_last"
    DROP_AUTHENTICATOR_MALFORMED = "nts_drop_authenticator_malformed"
    DROP_AUTH_FAILED = "nts_drop_auth_failed"
    DROP_ENCRYPTED_FIELDS = "nts_drop_encrypted_fields_malformed"
    DROP_NO_ROOM = "nts_drop_no_room"

    @property
    def outcome(self) -> NtsOutcome:
        if self is NtsReason.ANSWERED:
            return NtsOutcome.REPLY
        return NtsOutcome.NAK if self.name.startswith("NAK_") else NtsOutcome.DROP


_NAK_OF = {"cookie_malformed": NtsReason.NAK_COOKIE_MALFORMED,
           "cookie_unknown_key": NtsReason.NAK_COOKIE_UNKNOWN_KEY,
           "cookie_invalid": NtsReason.NAK_COOKIE_INVALID}


@dataclass(frozen=True, slots=True)
class NtsVerdict:
    reason: NtsReason
    unique_id_field: bytes = b""
    #: Room for extension fields in the reply: ``len(request) - 48``.
    room: int = 0
    s2c: bytes = b""
    algorithm: int = 0
    cookie_fields: bytes = b""
    cookies: int = 0
    nonce: bytes = b""

    @property
    def outcome(self) -> NtsOutcome:
        return self.reason.outcome

    def extensions(self, header: bytes) -> bytes:
        """The extension fields that follow ``header`` (the reply's 48 bytes, final: the
        authenticator covers them). For a NAK, the Unique Identifier alone."""
        if self.outcome is NtsOutcome.DROP:
            raise ValueError(f"no reply for a dropped NTS request ({self.reason.value})")
        if self.outcome is NtsOutcome.NAK:
            return self.unique_id_field
        if len(header) != HEADER_LEN:
            raise ValueError("an NTS reply header is 48 bytes")
        sealed = aead.seal(self.s2c, self.cookie_fields, header + self.unique_id_field,
                           self.nonce)
        return self.unique_id_field + encode_authenticator(
            self.nonce, sealed, self.room - len(self.unique_id_field))


def _drop(reason: NtsReason) -> NtsVerdict:
    return NtsVerdict(reason)


def answer(request: bytes, keys: MasterKeys,
           random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> NtsVerdict:
    """The verdict on one NTS request (see the module docstring). Never raises on any
    ``request``: every input ends in a counted :class:`NtsReason`."""
    if len(request) < HEADER_LEN:
        return _drop(NtsReason.DROP_SHORT)
    if request[0] & 0x3F != 0x23:  # version 4, mode 3
        return _drop(NtsReason.DROP_NOT_V4_CLIENT)
    try:
        fields = parse_fields(request, HEADER_LEN)
    except MalformedField:
        return _drop(NtsReason.DROP_MALFORMED_FIELDS)
    unique = cookie = auth = None
    cookie_len = -1
    wanted = 0
    for ef in fields:
        if ef.type == UNIQUE_IDENTIFIER:
            if unique is not None:
                return _drop(NtsReason.DROP_DUPLICATE_FIELD)
            unique = ef
        elif ef.type in (NTS_COOKIE, COOKIE_PLACEHOLDER):
            if ef.type == NTS_COOKIE:
                if cookie is not None:
                    return _drop(NtsReason.DROP_DUPLICATE_FIELD)
                cookie = ef
            if cookie_len >= 0 and cookie_len != len(ef.body):
                return _drop(NtsReason.DROP_COOKIE_LENGTHS)
            cookie_len = len(ef.body)
            wanted += 1
        elif ef.type == NTS_AUTHENTICATOR:
            if ef is not fields[-1]:
                return _drop(NtsReason.DROP_AUTHENTICATOR_NOT_LAST)
            auth = ef
    if unique is None:
        return _drop(NtsReason.DROP_NO_UNIQUE_ID)
    if len(unique.body) < MIN_UNIQUE_ID_LEN:
        return _drop(NtsReason.DROP_SHORT_UNIQUE_ID)
    if cookie is None:
        return _drop(NtsReason.DROP_NO_COOKIE)
    if auth is None:
        return _drop(NtsReason.DROP_NO_AUTHENTICATOR)
    try:
        authenticator = parse_authenticator(auth.body)
    except MalformedField:
        return _drop(NtsReason.DROP_AUTHENTICATOR_MALFORMED)
    unique_field = request[unique.offset:unique.offset + unique.length]
    try:
        contents = open_cookie(keys, cookie.body)
    except CookieRejected as rejected:
        return NtsVerdict(_NAK_OF[rejected.reason], unique_id_field=unique_field)
    plaintext = aead.open_sealed(contents.c2s, authenticator.ciphertext,
                                 request[:auth.offset], authenticator.nonce)
    if plaintext is None:
        return _drop(NtsReason.DROP_AUTH_FAILED)
    try:
        inner = parse_fields(plaintext)
    except MalformedField:
        return _drop(NtsReason.DROP_ENCRYPTED_FIELDS)
    for ef in inner:
        if ef.type == COOKIE_PLACEHOLDER:
            if len(ef.body) != cookie_len:
                return _drop(NtsReason.DROP_COOKIE_LENGTHS)
            wanted += 1
    return _reply(request, keys, contents, unique_field, min(wanted, MAX_COOKIES),
                  random_bytes)


def _reply(request: bytes, keys: MasterKeys, contents: CookieContents, unique_field: bytes,
           wanted: int, random_bytes: Callable[[int], bytes]) -> NtsVerdict:
    room = len(request) - HEADER_LEN
    one = len(encode_field(NTS_COOKIE, bytes(cookie_length(contents.algorithm))))
    fixed = len(unique_field)
    count = wanted
    while count >= 0 and fixed + authenticator_length(
            REPLY_NONCE_LEN, aead.TAG_LENGTH + count * one) > room:
        count -= 1
    if count < 0:
        return _drop(NtsReason.DROP_NO_ROOM)
    cookie_fields = b"".join(
        encode_field(NTS_COOKIE, make_cookie(keys, contents, random_bytes(16)))
        for _ in range(count))
    return NtsVerdict(NtsReason.ANSWERED, unique_field, room, contents.s2c,
                      contents.algorithm, cookie_fields, count, random_bytes(REPLY_NONCE_LEN))


class NtsCounters:
    """Counts by :class:`NtsReason`, plus cookies issued (accepted = ``nts_answered``)."""

    def __init__(self) -> None:
        self.by_reason: Counter[NtsReason] = Counter()
        self.cookies_issued = 0

    def add(self, verdict: NtsVerdict) -> None:
        self.by_reason[verdict.reason] += 1
        self.cookies_issued += verdict.cookies

    def snapshot(self) -> dict[str, int]:
        table = {reason.value: self.by_reason.get(reason, 0) for reason in NtsReason}
        table["nts_cookies_issued"] = self.cookies_issued
        return table
