"""NTS pure pieces: records, extension fields, cookies, the responder (RFC 8915)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardntp.nts import aead
from guardntp.nts.client import build_request, check_reply, is_nts_nak, request_header
from guardntp.nts.cookies import (
    CookieContents,
    CookieRejected,
    MasterKey,
    MasterKeys,
    cookie_length,
    make_cookie,
    open_cookie,
    rotate,
)
from guardntp.nts.extensions import (
    NTS_AUTHENTICATOR,
    NTS_COOKIE,
    UNIQUE_IDENTIFIER,
    encode_field,
    has_unique_identifier,
    parse_fields,
)
from guardntp.nts.records import (
    AEAD_ALGORITHM,
    END_OF_MESSAGE,
    ERROR,
    NEW_COOKIE,
    NEXT_PROTOCOL,
    NTPV4_PORT,
    NTPV4_SERVER,
    WARNING,
    KeOutcome,
    KeSettings,
    MessageReader,
    Record,
    RecordError,
    encode_records,
    exporter_context,
    parse_response,
    respond,
)
from guardntp.nts.responder import NtsCounters, NtsOutcome, NtsReason, answer

C2S = bytes(range(32))
S2C = bytes(range(32, 64))
UID = b"U" * 32
NONCE = b"N" * 16


def keys_at(*ids: int) -> MasterKeys:
    return MasterKeys.of(tuple(MasterKey(i, bytes([i]) * 64, 1000 + i) for i in ids))


def counter_random() -> object:
    state = {"n": 0}

    def random_bytes(n: int) -> bytes:
        state["n"] += 1
        return (state["n"].to_bytes(4, "big") * (n // 4 + 1))[:n]
    return random_bytes


def cookie_for(keys: MasterKeys, algorithm: int = aead.AES_SIV_CMAC_256) -> bytes:
    n = aead.KEY_LENGTH[algorithm]
    contents = CookieContents(algorithm, C2S[:n] if n == 32 else C2S * 2,
                              S2C[:n] if n == 32 else S2C * 2)
    return make_cookie(keys, contents, b"c" * 16)


def request(keys: MasterKeys, placeholders: int = 0, cookie: bytes | None = None,
            c2s: bytes = C2S) -> bytes:
    return build_request(request_header(0x1122334455667788), cookie or cookie_for(keys), c2s,
                         UID, NONCE, placeholders)


def reply_header(req: bytes) -> bytes:
    return bytes([0x24, 2, 6, 0xEC]) + bytes(20) + req[40:48] + bytes(16)


# --- extension fields ---------------------------------------------------------------

def test_field_encoding_pads_to_4_and_16() -> None:
    assert encode_field(NTS_COOKIE, b"abc") == b"\x02\x04\x00\x10abc" + bytes(9)
    assert len(encode_field(NTS_COOKIE, bytes(13))) == 20
    fields = parse_fields(encode_field(1, bytes(12)) + encode_field(2, bytes(20)))
    assert [(f.type, f.offset, f.length) for f in fields] == [(1, 0, 16), (2, 16, 24)]


def test_detecting_an_nts_request_cheaply() -> None:
    keys = keys_at(1)
    req = request(keys)
    assert req[48:50] == b"\x01\x04" and has_unique_identifier(req)
    # the identifier elsewhere than first is found too
    other = req[:48] + encode_field(0x0F00, bytes(12)) + req[48:]
    assert has_unique_identifier(other)
    assert not has_unique_identifier(req[:48])
    assert not has_unique_identifier(bytes([0x1B]) + req[1:])  # NTPv3
    assert not has_unique_identifier(req[:48] + bytes(20))  # a MAC-looking tail


# --- cookies ------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [aead.AES_SIV_CMAC_256, aead.AES_SIV_CMAC_512])
def test_cookie_round_trip_and_length(algorithm: int) -> None:
    keys = keys_at(7)
    cookie = cookie_for(keys, algorithm)
    assert len(cookie) == cookie_length(algorithm) and len(cookie) % 4 == 0
    contents = open_cookie(keys, cookie)
    assert contents.algorithm == algorithm and contents.c2s[:32] == C2S


def test_cookie_rejections() -> None:
    keys = keys_at(7)
    cookie = cookie_for(keys)
    with pytest.raises(CookieRejected, match="cookie_malformed"):
        open_cookie(keys, cookie[:20])
    with pytest.raises(CookieRejected, match="cookie_unknown_key"):
        open_cookie(keys_at(8), cookie)
    tampered = cookie[:-1] + bytes([cookie[-1] ^ 1])
    with pytest.raises(CookieRejected, match="cookie_invalid"):
        open_cookie(keys, tampered)
    # a cookie under a key of the same id but other bytes does not open either
    forged = MasterKeys.of((MasterKey(7, b"x" * 64, 0),))
    with pytest.raises(CookieRejected, match="cookie_invalid"):
        open_cookie(forged, cookie)


def test_rotation_keeps_previous_keys_for_a_while() -> None:
    random_bytes = counter_random()
    keys = rotate((), 0, 100, 2, random_bytes)  # type: ignore[arg-type]
    assert len(keys) == 1
    assert rotate(keys, 99, 100, 2, random_bytes) == keys  # type: ignore[arg-type]
    history = [keys]
    for now in (100, 200, 300, 400):
        keys = rotate(keys, now, 100, 2, random_bytes)  # type: ignore[arg-type]
        history.append(keys)
    assert len(keys) == 3 and [k.created_s for k in keys] == [200, 300, 400]
    old_cookie = make_cookie(MasterKeys.of(history[2]), CookieContents(15, C2S, S2C), NONCE)
    assert open_cookie(MasterKeys.of(history[3]), old_cookie).c2s == C2S  # one rotation later
    assert open_cookie(MasterKeys.of(history[4]), old_cookie).c2s == C2S  # two
    with pytest.raises(CookieRejected, match="unknown_key"):
        open_cookie(MasterKeys.of(rotate(keys, 500, 100, 2, random_bytes)),  # type: ignore[arg-type]
                    old_cookie)


# --- the responder ------------------------------------------------------------------

@pytest.mark.parametrize("placeholders", [0, 1, 7, 9])
def test_answer_round_trip(placeholders: int) -> None:
    keys = keys_at(1, 2)
    req = request(keys, placeholders)
    verdict = answer(req, keys)
    assert verdict.reason is NtsReason.ANSWERED
    header = reply_header(req)
    reply = header + verdict.extensions(header)
    assert len(reply) == len(req)
    checked = check_reply(reply, S2C, UID)
    assert len(checked.cookies) == min(placeholders + 1, 8) == verdict.cookies
    # the fresh cookies carry the same session keys, under the current master key
    for cookie in checked.cookies:
        assert open_cookie(keys, cookie) == CookieContents(15, C2S, S2C)
        assert cookie[:4] == struct.pack("!I", keys.current.id)


def test_reply_covers_the_header() -> None:
    keys = keys_at(1)
    req = request(keys)
    verdict = answer(req, keys)
    header = reply_header(req)
    reply = bytearray(header + verdict.extensions(header))
    reply[40] ^= 1  # a forged transmit timestamp
    with pytest.raises(ValueError, match="does not verify"):
        check_reply(bytes(reply), S2C, UID)


def test_cookie_from_before_a_rotation_still_answers() -> None:
    before = keys_at(1)
    after = keys_at(1, 2)
    assert after.current.id == 2
    assert answer(request(before), after).reason is NtsReason.ANSWERED


def test_undecryptable_cookie_gets_a_nak_with_the_unique_id() -> None:
    keys = keys_at(1)
    cookie = bytearray(cookie_for(keys))
    cookie[30] ^= 0x40
    req = request(keys, cookie=bytes(cookie))
    verdict = answer(req, keys)
    assert verdict.reason is NtsReason.NAK_COOKIE_INVALID
    assert verdict.outcome is NtsOutcome.NAK
    fields = verdict.extensions(b"")
    assert parse_fields(fields)[0].type == UNIQUE_IDENTIFIER
    nak = bytes([0x24, 0]) + bytes(10) + b"NTSN" + bytes(32) + fields
    assert is_nts_nak(nak, UID) and len(nak) <= len(req)
    expired = answer(request(keys_at(9)), keys)
    assert expired.reason is NtsReason.NAK_COOKIE_UNKNOWN_KEY


def test_tampered_authenticator_is_dropped_not_naked() -> None:
    keys = keys_at(1)
    req = bytearray(request(keys))
    req[-5] ^= 1
    assert answer(bytes(req), keys).reason is NtsReason.DROP_AUTH_FAILED
    wrong_key = request(keys, c2s=bytes(32))
    assert answer(wrong_key, keys).reason is NtsReason.DROP_AUTH_FAILED
    header_changed = bytearray(request(keys))
    header_changed[41] ^= 1
    assert answer(bytes(header_changed), keys).reason is NtsReason.DROP_AUTH_FAILED


def test_malformed_requests_each_have_their_reason() -> None:
    keys = keys_at(1)
    good = request(keys)
    uid = encode_field(UNIQUE_IDENTIFIER, UID)
    cookie = encode_field(NTS_COOKIE, cookie_for(keys))
    head = good[:48]
    auth = good[48 + len(uid) + len(cookie):]
    cases = {
        NtsReason.DROP_SHORT: good[:47],
        NtsReason.DROP_NOT_V4_CLIENT: bytes([0x1B]) + good[1:],
        NtsReason.DROP_MALFORMED_FIELDS: good[:-2],
        NtsReason.DROP_NO_UNIQUE_ID: head + cookie + auth,
        NtsReason.DROP_SHORT_UNIQUE_ID: head + encode_field(UNIQUE_IDENTIFIER, b"u" * 16)
        + cookie + auth,
        NtsReason.DROP_NO_COOKIE: head + uid + auth,
        NtsReason.DROP_DUPLICATE_FIELD: head + uid + cookie + cookie + auth,
        NtsReason.DROP_COOKIE_LENGTHS: head + uid + cookie
        + encode_field(0x0304, bytes(12)) + auth,
        NtsReason.DROP_NO_AUTHENTICATOR: head + uid + cookie,
        NtsReason.DROP_AUTHENTICATOR_NOT_LAST: head + uid + cookie + auth
        + encode_field(0x0F00, bytes(12)),
        NtsReason.DROP_AUTHENTICATOR_MALFORMED: head + uid + cookie
        + encode_field(NTS_AUTHENTICATOR, struct.pack("!HH", 8, 16) + bytes(24)),
    }
    counters = NtsCounters()
    for reason, data in cases.items():
        verdict = answer(data, keys)
        assert verdict.reason is reason, reason
        assert verdict.outcome is NtsOutcome.DROP
        with pytest.raises(ValueError):
            verdict.extensions(bytes(48))
        counters.add(verdict)
    snapshot = counters.snapshot()
    assert all(snapshot[reason.value] == 1 for reason in cases)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    keys = keys_at(1)
    for candidate in (data, bytes([0x23]) + data[1:], bytes([0x23]) + bytes(47) + data):
        verdict = answer(candidate, keys)
        assert isinstance(verdict.reason, NtsReason)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(placeholders=st.integers(0, 12), uid_len=st.integers(32, 80),
       nonce_len=st.integers(16, 40), extra=st.lists(st.binary(min_size=12, max_size=40),
                                                   max_size=3),
       short_placeholders=st.booleans(), flip=st.integers(0, 2000))
def test_reply_is_never_longer_than_an_accepted_request(
        placeholders: int, uid_len: int, nonce_len: int, extra: list[bytes],
        short_placeholders: bool, flip: int) -> None:
    keys = keys_at(1, 2)
    cookie = cookie_for(keys)
    header = request_header(42)
    body = header + encode_field(UNIQUE_IDENTIFIER, b"u" * uid_len) + b"".join(
        encode_field(0x2000 + i, value) for i, value in enumerate(extra))
    body += encode_field(NTS_COOKIE, cookie)
    holder_len = 20 if short_placeholders else len(cookie)
    body += b"".join(encode_field(0x0304, bytes(holder_len)) for _ in range(placeholders))
    nonce = b"n" * nonce_len
    from guardntp.nts.extensions import encode_authenticator
    req = body + encode_authenticator(nonce, aead.seal(C2S, b"", body, nonce))
    candidates = [req]
    if flip < len(req) * 8:
        mutated = bytearray(req)
        mutated[flip // 8] ^= 1 << (flip % 8)
        candidates.append(bytes(mutated))
    for candidate in candidates:
        verdict = answer(candidate, keys)
        if verdict.outcome is NtsOutcome.DROP:
            continue
        extensions = verdict.extensions(reply_header(candidate))
        assert 48 + len(extensions) <= len(candidate)
    verdict = answer(req, keys)
    if short_placeholders and placeholders:
        assert verdict.reason is NtsReason.DROP_COOKIE_LENGTHS
    else:
        assert verdict.reason is NtsReason.ANSWERED
        assert verdict.cookies <= min(placeholders + 1, 8)


# --- NTS-KE records -----------------------------------------------------------------

def ke_request(*records: Record) -> list[Record]:
    reader = MessageReader()
    out = reader.feed(encode_records(list(records)))
    assert out is not None
    return out


NTPV4 = Record(NEXT_PROTOCOL, b"\x00\x00", critical=True)
SIV256 = Record(AEAD_ALGORITHM, b"\x00\x0f", critical=True)
EOM = Record(END_OF_MESSAGE, critical=True)


def fake_export(context: bytes, length: int) -> bytes:
    return (context * length)[:length]


def make(alg: int, c2s: bytes, s2c: bytes) -> bytes:
    return b"K" * 8 + struct.pack("!H", alg) + c2s[:2]


def test_ke_negotiation_ok_with_port_and_server() -> None:
    response, outcome = respond(ke_request(NTPV4, Record(AEAD_ALGORITHM, b"\x00\x1e\x00\x0f"),
                                           EOM),
                                KeSettings(ntp_server="127.0.0.1", ntp_port=12300),
                                fake_export, make)
    assert outcome is KeOutcome.OK
    records = MessageReader().feed(response)
    assert records is not None
    types = [r.type for r in records]
    assert types == [NEXT_PROTOCOL, AEAD_ALGORITHM, NTPV4_SERVER, NTPV4_PORT] + \
        [NEW_COOKIE] * 8 + [END_OF_MESSAGE]
    result = parse_response(records)
    assert (result.algorithm, result.server, result.port) == (15, "127.0.0.1", 12300)
    assert result.cookies[0] == b"K" * 8 + b"\x00\x0f" + exporter_context(15, False)[:2]
    assert exporter_context(15, True) == b"\x00\x00\x00\x0f\x01"


def test_ke_no_server_or_port_records_on_123() -> None:
    response, _ = respond(ke_request(NTPV4, SIV256, EOM), KeSettings(), fake_export, make)
    records = MessageReader().feed(response)
    assert records is not None
    assert NTPV4_PORT not in [r.type for r in records]
    assert NTPV4_SERVER not in [r.type for r in records]


@pytest.mark.parametrize("records, outcome, error", [
    ((Record(0x4321, b"x", critical=True), NTPV4, SIV256, EOM),
     KeOutcome.UNRECOGNIZED_CRITICAL, 0),
    ((Record(0x4321, b"x"), NTPV4, SIV256, EOM), KeOutcome.OK, None),
    ((SIV256, EOM), KeOutcome.BAD_REQUEST, 1),
    ((NTPV4, NTPV4, SIV256, EOM), KeOutcome.BAD_REQUEST, 1),
    ((Record(NEXT_PROTOCOL, b"\x00\x00"), SIV256, EOM), KeOutcome.BAD_REQUEST, 1),
    ((NTPV4, EOM), KeOutcome.BAD_REQUEST, 1),
    ((NTPV4, Record(AEAD_ALGORITHM, b"\x00"), EOM), KeOutcome.BAD_REQUEST, 1),
    ((NTPV4, SIV256, Record(ERROR, b"\x00\x01", critical=True), EOM),
     KeOutcome.BAD_REQUEST, 1),
    ((NTPV4, SIV256, Record(WARNING, b"\x00\x01"), EOM), KeOutcome.BAD_REQUEST, 1),
    ((Record(NEXT_PROTOCOL, b"\x80\x01", critical=True), SIV256, EOM),
     KeOutcome.NO_PROTOCOL, None),
    ((NTPV4, Record(AEAD_ALGORITHM, b"\x00\x1e"), EOM), KeOutcome.NO_AEAD, None),
])
def test_ke_errors(records: tuple[Record, ...], outcome: KeOutcome, error: int | None) -> None:
    response, got = respond(ke_request(*records), KeSettings(), fake_export, make)
    assert got is outcome
    parsed = MessageReader().feed(response)
    assert parsed is not None and parsed[-1].type == END_OF_MESSAGE
    errors = [r for r in parsed if r.type == ERROR]
    if error is None:
        assert not errors
    else:
        assert errors[0].body == struct.pack("!H", error) and errors[0].critical
        with pytest.raises(RecordError, match=f"ke_error_{error}"):
            parse_response(parsed)


def test_ke_internal_error_when_the_exporter_fails() -> None:
    def broken(context: bytes, length: int) -> bytes:
        raise RuntimeError("no")
    response, outcome = respond(ke_request(NTPV4, SIV256, EOM), KeSettings(), broken, make)
    assert outcome is KeOutcome.INTERNAL and response.startswith(b"\x80\x02\x00\x02\x00\x02")


def test_message_reader_limits_and_incremental_feed() -> None:
    data = encode_records([NTPV4, SIV256, EOM])
    reader = MessageReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i:i + 1]) is None
    assert reader.feed(data[-1:]) is not None
    with pytest.raises(RecordError, match="record_too_long"):
        MessageReader(max_body=16).feed(struct.pack("!HH", 5, 17))
    with pytest.raises(RecordError, match="message_too_long"):
        MessageReader(max_message=64).feed(encode_records([Record(5, bytes(40))] * 2))
    with pytest.raises(RecordError, match="too_many_records"):
        MessageReader(max_records=3).feed(encode_records([Record(5)] * 5))
    with pytest.raises(RecordError, match="data_after_end"):
        MessageReader().feed(data + b"\x00")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_ke_arbitrary_bytes_end_in_a_reason(data: bytes) -> None:
    reader = MessageReader(max_body=128, max_message=256)
    try:
        records = reader.feed(data)
    except RecordError as error:
        assert error.reason
        return
    if records is not None:
        response, outcome = respond(records, KeSettings(), fake_export, make)
        assert isinstance(outcome, KeOutcome) and response
