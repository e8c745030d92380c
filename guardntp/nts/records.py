"""NTS Key Establishment records and the server's side of the negotiation (RFC 8915 §4)
(pure).

A record is ``C (1 bit) | type (15 bits) | body length (16) | body``; a message is
records up to and including End of Message. :class:`MessageReader` takes bytes as
they arrive and enforces the limits (body length of one record, total size,
number of records); :func:`respond` turns a complete request into the response
bytes, given the TLS exporter (``export(context, length)``) and a cookie maker.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import aead
from .settings import DEFAULT_COOKIES

END_OF_MESSAGE = 0
NEXT_PROTOCOL = 1
ERROR = 2
WARNING = 3
AEAD_ALGORITHM = 4
NEW_COOKIE = 5
NTPV4_SERVER = 6
NTPV4_PORT = 7
CRITICAL = 0x8000
KNOWN = frozenset(range(8))

PROTOCOL_NTPV4 = 0
ERROR_UNRECOGNIZED_CRITICAL = 0
ERROR_BAD_REQUEST = 1
ERROR_INTERNAL = 2

EXPORTER_LABEL = b"EXPORTER-network-time-security"


@dataclass(frozen=True, slots=True)
class Record:
    type: int
    body: bytes = b""
    critical: bool = False

    def encode(self) -> bytes:
        return struct.pack("!HH", self.type | (CRITICAL if self.critical else 0),
                           len(self.body)) + self.body


def encode_records(records: list[Record]) -> bytes:
    return b"".join(record.encode() for record in records)


def u16_list(body: bytes) -> list[int] | None:
    """The 16-bit values of ``body``, or None when its length is odd."""
    if len(body) % 2:
        return None
    return list(struct.unpack(f"!{len(body) // 2}H", body))


class RecordError(ValueError):
    """A request that breaks the record layer or a limit; ``reason`` is a counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageReader:
    """Accumulates a request; :meth:`feed` returns the records once End of Message has
    arrived (None before). Raises :class:`RecordError` (``record_too_long``,
    ``message_too_long``, ``too_many_records``, ``data_after_end``)."""

    def __init__(self, max_body: int = 1024, max_message: int = 4096,
                 max_records: int = 64) -> None:
        self.max_body = max_body
        self.max_message = max_message
        self.max_records = max_records
        self.buffer = bytearray()
        self.records: list[Record] = []
        self.offset = 0
        self.done = False

    def feed(self, data: bytes) -> list[Record] | None:
        if self.done:
            if data:
                raise RecordError("data_after_end")
            return self.records
        self.buffer += data
        if len(self.buffer) > self.max_message:
            raise RecordError("message_too_long")
        while len(self.buffer) - self.offset >= 4:
            word, length = struct.unpack_from("!HH", self.buffer, self.offset)
            if length > self.max_body:
                raise RecordError("record_too_long")
            if len(self.buffer) - self.offset - 4 < length:
                break
            body = bytes(self.buffer[self.offset + 4:self.offset + 4 + length])
            self.offset += 4 + length
            self.records.append(Record(word & ~CRITICAL, body, bool(word & CRITICAL)))
            if len(self.records) > self.max_records:
                raise RecordError("too_many_records")
            if word & ~CRITICAL == END_OF_MESSAGE:
                if self.offset != len(self.buffer):
                    raise RecordError("data_after_end")
                self.done = True
                return self.records
        return None


class KeOutcome(enum.Enum):
    """How a complete request ended; the value is the counter name."""

    OK = "ke_ok"
    UNRECOGNIZED_CRITICAL = "ke_error_unrecognized_critical"
    BAD_REQUEST = "ke_error_bad_request"
    NO_PROTOCOL = "ke_no_common_protocol"
    NO_AEAD = "ke_no_common_aead"
    INTERNAL = "ke_error_internal"


@dataclass(frozen=True, slots=True)
class KeSettings:
    """What the NTS-KE server tells clients: where the NTP service is (``ntp_server``,
    sent when set; ``ntp_port``, sent when not 123), how many cookies to give, which
    AEAD algorithms are allowed."""

    ntp_server: str | None = None
    ntp_port: int = 123
    cookies: int = DEFAULT_COOKIES
    algorithms: tuple[int, ...] = aead.PREFERENCE


def exporter_context(algorithm: int, s2c: bool) -> bytes:
    """RFC 8915 §5.1: protocol id 0 (NTPv4), the AEAD id, 0x00 for C2S / 0x01 for S2C."""
    return struct.pack("!HHB", PROTOCOL_NTPV4, algorithm, 1 if s2c else 0)


def error_response(code: int) -> bytes:
    return encode_records([Record(ERROR, struct.pack("!H", code), critical=True),
                           Record(END_OF_MESSAGE, critical=True)])


def respond(records: list[Record], settings: KeSettings,
            export: Callable[[bytes, int], bytes],
            make_cookie: Callable[[int, bytes, bytes], bytes]) -> tuple[bytes, KeOutcome]:
    """The response to a complete request and how it ended.

    ``export(context, length)`` is the TLS exporter under :data:`EXPORTER_LABEL`;
    ``make_cookie(algorithm, c2s, s2c)`` makes one cookie."""
    protocols: list[int] | None = None
    algorithms: list[int] | None = None
    for record in records[:-1]:
        if record.type == END_OF_MESSAGE:
            return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
        if record.type not in KNOWN:
            if record.critical:
                return (error_response(ERROR_UNRECOGNIZED_CRITICAL),
                        KeOutcome.UNRECOGNIZED_CRITICAL)
            continue
        if record.type in (ERROR, WARNING):
            # RFC 8915 §4.1.3-4: clients must not send them.
            return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
        if record.type == NEXT_PROTOCOL:
            if protocols is not None or not record.critical:
                return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
            protocols = u16_list(record.body)
            if protocols is None:
                return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
        elif record.type == AEAD_ALGORITHM:
            if algorithms is not None:
                return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
            algorithms = u16_list(record.body)
            if algorithms is None:
                return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
        # New Cookie, Server and Port records from a client are hints; ignored.
    if not records or records[-1].type != END_OF_MESSAGE or protocols is None:
        return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
    if PROTOCOL_NTPV4 not in protocols:
        return encode_records([Record(NEXT_PROTOCOL, b"", critical=True),
                               Record(END_OF_MESSAGE, critical=True)]), KeOutcome.NO_PROTOCOL
    if algorithms is None:
        return error_response(ERROR_BAD_REQUEST), KeOutcome.BAD_REQUEST
    chosen = next((a for a in algorithms if a in settings.algorithms and a in aead.KEY_LENGTH),
                  None)
    protocol = Record(NEXT_PROTOCOL, struct.pack("!H", PROTOCOL_NTPV4), critical=True)
    if chosen is None:
        return encode_records([protocol, Record(AEAD_ALGORITHM, b"", critical=True),
                               Record(END_OF_MESSAGE, critical=True)]), KeOutcome.NO_AEAD
    length = aead.KEY_LENGTH[chosen]
    try:
        c2s = export(exporter_context(chosen, s2c=False), length)
        s2c = export(exporter_context(chosen, s2c=True), length)
        cookies = [make_cookie(chosen, c2s, s2c) for _ in range(settings.cookies)]
    except Exception:  # the exporter or the key store failed: say so, in one record
        return error_response(ERROR_INTERNAL), KeOutcome.INTERNAL
    response = [protocol, Record(AEAD_ALGORITHM, struct.pack("!H", chosen), critical=True)]
    if settings.ntp_server is not None:
        response.append(Record(NTPV4_SERVER, settings.ntp_server.encode("ascii"),
                               critical=True))
    if settings.ntp_port != 123:
        response.append(Record(NTPV4_PORT, struct.pack("!H", settings.ntp_port), critical=True))
    response += [Record(NEW_COOKIE, cookie) for cookie in cookies]
    response.append(Record(END_OF_MESSAGE, critical=True))
    return encode_records(response), KeOutcome.OK


@dataclass(frozen=True, slots=True)
class KeResult:
    """A client's reading of a response (for ``guardntp query --nts`` and the tests)."""

    algorithm: int
    cookies: tuple[bytes, ...]
    server: str | None
    port: int | None


def parse_response(records: list[Record]) -> KeResult:
    """The negotiated algorithm, cookies and NTP address of a response; :class:`RecordError`
    (reason ``ke_error_N``, ``ke_warning_N``, ``ke_bad_response``) otherwise."""
    algorithm: int | None = None
    protocol_ok = False
    cookies: list[bytes] = []
    server: str | None = None
    port: int | None = None
    for record in records:
        values = u16_list(record.body)
        if record.type == ERROR:
            raise RecordError(f"ke_error_{values[0] if values else '?'}")
        if record.type == WARNING:
            raise RecordError(f"ke_warning_{values[0] if values else '?'}")
        if record.type == NEXT_PROTOCOL:
            protocol_ok = values == [PROTOCOL_NTPV4]
        elif record.type == AEAD_ALGORITHM and values and len(values) == 1:
            algorithm = values[0]
        elif record.type == NEW_COOKIE:
            cookies.append(record.body)
        elif record.type == NTPV4_SERVER:
            server = record.body.decode("ascii", "replace")
        elif record.type == NTPV4_PORT and values and len(values) == 1:
            port = values[0]
        elif record.type not in KNOWN and record.critical:
            raise RecordError("ke_bad_response")
    if not protocol_ok or algorithm not in aead.KEY_LENGTH or not cookies:
        raise RecordError("ke_bad_response")
    return KeResult(algorithm, tuple(cookies), server, port)
