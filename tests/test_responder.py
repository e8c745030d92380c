"""The stateless responder (protocol-rules.md, RFC 5905 §8-9), driven the way the server
drives it: ``Pipeline.decide`` (sanity, then the responder's reply), then the transmit
timestamp the socket loop writes just before sending."""

from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardntp.clock import ClockState, unsynchronized
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.responder import Responder, inspect_request
from guardntp.timestamps import NS_PER_S, short_to_ns, unix_ns_to_ntp
from guardntp.verdicts import VERDICT_OF, Reason, Verdict
from guardntp.wire import Leap, Mode, NtpPacket, encode, parse

NOW = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=bytes([192, 0, 2, 7]), precision=-20,
                   root_delay_ns=5_000_000, root_dispersion_ns=1_000_000,
                   reference_unix_ns=NOW - 64 * NS_PER_S)


def request(version=4, mode=Mode.CLIENT, poll=6, xmt=0xDEAD_BEEF_0123_4567, **fields):
    return encode(NtpPacket(version=version, mode=mode, poll=poll, transmit_ts=xmt, **fields))


SOURCE = bytes((192, 0, 2, 10))
SENT = NOW + 1000   # when the socket loop stamps the transmit field


class Answer(NamedTuple):
    reason: Reason
    reply: bytes | None


def answer(data, port=40000, clock=CLOCK, answer_symmetric=True) -> Answer:
    """One request from a fresh source, as ``server.py`` handles it: received at NOW,
    decided, and a time reply's transmit field written at SENT."""
    responder = Responder(clock, SENT)
    pipeline = Pipeline(FilterPolicy(answer_symmetric=answer_symmetric, max_newcomers=1),
                        responder)
    reason, reply, _signer = pipeline.decide(data, SOURCE, port, NOW, NOW)
    if reply is not None and VERDICT_OF[reason] is Verdict.TIME:
        reply = reply[:40] + responder.served_ntp(SENT).to_bytes(8, "big") + reply[48:]
    return Answer(reason, reply)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(0, 65535))
def test_any_bytes_give_a_reply_or_a_verdict_never_an_exception(data, port):
    outcome = answer(data, port)
    assert isinstance(outcome.reason, Reason)
    if outcome.reply is not None:
        assert VERDICT_OF[outcome.reason] is Verdict.TIME
        assert len(outcome.reply) <= len(data)            # no amplification, ever
        assert outcome.reply[24:32] == data[40:48]        # origin = request transmit, bit-exact


@given(st.integers(1, 4), st.sampled_from([Mode.CLIENT, Mode.SYMMETRIC_ACTIVE]),
       st.integers(-128, 127), st.integers(0, 2**64 - 1))
def test_versions_1_to_4_answered_in_kind(version, mode, poll, xmt):
    data = request(version, mode, poll, xmt)
    outcome = answer(data)
    assert outcome.reason is Reason.ANSWERED
    reply = parse(outcome.reply)
    assert reply.version == version
    assert reply.mode == (Mode.SERVER if mode == Mode.CLIENT else Mode.SYMMETRIC_PASSIVE)
    assert reply.poll == poll
    assert reply.origin_ts == xmt
    assert reply.stratum == 2 and reply.refid == bytes([192, 0, 2, 7])


def test_timestamps_receive_and_transmit():
    reply = parse(answer(request()).reply)
    assert reply.receive_ts == unix_ns_to_ntp(NOW)
    assert reply.transmit_ts == unix_ns_to_ntp(SENT)
    assert reply.reference_ts == unix_ns_to_ntp(NOW - 64 * NS_PER_S)


@pytest.mark.parametrize("mode,reason", [
    (Mode.SYMMETRIC_PASSIVE, Reason.NOT_A_REQUEST), (Mode.SERVER, Reason.NOT_A_REQUEST),
    (Mode.BROADCAST, Reason.NOT_A_REQUEST), (Mode.CONTROL, Reason.CONTROL_MODE),
    (Mode.PRIVATE, Reason.PRIVATE_MODE), (Mode.RESERVED, Reason.RESERVED_MODE)])
def test_modes_that_get_no_reply(mode, reason):
    outcome = answer(request(mode=mode))
    assert outcome.reply is None and outcome.reason is reason


def test_ntpv1_mode_0_is_a_client_request_unless_from_port_123():
    data = request(version=1, mode=Mode.RESERVED)
    assert answer(data, port=23457).reason is Reason.ANSWERED
    assert parse(answer(data, port=23457).reply).mode == Mode.SERVER
    assert answer(data, port=123).reason is Reason.RESERVED_MODE


def test_symmetric_mode_can_be_turned_off():
    outcome = answer(request(mode=Mode.SYMMETRIC_ACTIVE), answer_symmetric=False)
    assert outcome.reason is Reason.SYMMETRIC_DISABLED


def test_data_minimised_request_depends_on_no_other_field():
    # Only version, mode and a random transmit timestamp (draft-ietf-ntp-data-minimization).
    minimal = bytes([0x23]) + bytes(39) + (0x0102030405060708).to_bytes(8, "big")
    noisy = bytes([0x23, 3, 6, 0xEC]) + bytes(range(36)) + minimal[40:]
    a, b = answer(minimal).reply, answer(noisy).reply
    assert a[:2] == b[:2] and a[3:] == b[3:]  # only the copied poll differs


def test_unsynchronised_server_sends_li3_stratum_0():
    reply = parse(answer(request(), clock=unsynchronized("system", "test")).reply)
    assert reply.leap == Leap.UNSYNCHRONIZED and reply.stratum == 0


def test_root_dispersion_grows_15ppm_with_age_of_last_update():
    responder = Responder(CLOCK, NOW)
    early = parse(responder.time_reply(request(), inspect_request(request(), 1), 0))
    responder.set_clock(CLOCK, NOW + 1000 * NS_PER_S)
    late = parse(responder.time_reply(request(), inspect_request(request(), 1), 0))
    grown_ns = short_to_ns(late.root_dispersion) - short_to_ns(early.root_dispersion)
    assert abs(grown_ns - 15_000_000) < 50_000  # 1000 s x 15 ppm = 15 ms


def test_request_with_mac_but_no_keys_is_dropped():
    data = request() + (1).to_bytes(4, "big") + bytes(16)
    assert answer(data).reason is Reason.AUTH_FAILED


def test_crypto_nak_in_request_is_dropped():
    assert answer(request() + bytes(4)).reason is Reason.CRYPTO_NAK


def test_unknown_extension_field_ignored_reply_is_48_bytes():
    data = request() + (0x4242).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(12) \
        + (0x4243).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(12)
    outcome = answer(data)
    assert outcome.reason is Reason.ANSWERED and len(outcome.reply) == 48


def test_kod_reveals_no_server_time():
    responder = Responder(CLOCK, NOW)
    data = request(poll=3)
    kod = parse(responder.kod_reply(data, inspect_request(data, 1), b"RATE", 6))
    xmt = 0xDEAD_BEEF_0123_4567
    assert kod.stratum == 0 and kod.kiss_code == "RATE" and kod.leap == Leap.UNSYNCHRONIZED
    assert kod.origin_ts == kod.receive_ts == kod.transmit_ts == xmt
    assert kod.reference_ts == 0 and kod.root_delay == 0 and kod.root_dispersion == 0
    assert kod.poll == 6 and kod.mode == Mode.SERVER
