import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardntp.wire import (
    Leap,
    MalformedPacket,
    Mode,
    NtpPacket,
    TailKind,
    encode,
    parse,
    refid_to_text,
)


def header(version=4, mode=3, xmt=0x1234_5678_9ABC_DEF0):
    return encode(NtpPacket(version=version, mode=Mode(mode), transmit_ts=xmt))


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_malformed(data):
    try:
        packet = parse(data)
    except MalformedPacket as error:
        assert error.reason in {"short", "unaligned", "version", "ext_field", "mac_length"}
    else:
        assert 1 <= packet.version <= 4


@given(st.builds(NtpPacket, leap=st.sampled_from(Leap), version=st.integers(1, 4),
                 mode=st.sampled_from(Mode), stratum=st.integers(0, 255),
                 poll=st.integers(-128, 127), precision=st.integers(-128, 127),
                 root_delay=st.integers(0, 2**32 - 1), root_dispersion=st.integers(0, 2**32 - 1),
                 refid=st.binary(min_size=4, max_size=4),
                 reference_ts=st.integers(0, 2**64 - 1), origin_ts=st.integers(0, 2**64 - 1),
                 receive_ts=st.integers(0, 2**64 - 1), transmit_ts=st.integers(0, 2**64 - 1)))
def test_encode_parse_round_trip(packet):
    assert parse(encode(packet)) == packet


@pytest.mark.parametrize("length,reason", [(0, "short"), (47, "short"), (50, "unaligned")])
def test_bad_lengths(length, reason):
    with pytest.raises(MalformedPacket) as caught:
        parse(bytes(length))
    assert caught.value.reason == reason


def test_version_zero_and_five_rejected():
    for version in (0, 5, 7):
        with pytest.raises(MalformedPacket):
            parse(bytes([version << 3 | 3]) + bytes(47))


def test_v3_tail_is_a_mac():
    packet = parse(header(version=3) + struct.pack("!I", 7) + bytes(16))
    assert packet.tail.kind is TailKind.MAC and packet.tail.mac.key_id == 7
    assert packet.tail.mac.offset == 48 and len(packet.tail.mac.digest) == 16


def test_ms_sntp_twenty_zero_bytes_is_a_mac():
    packet = parse(header(version=3) + bytes(20))
    assert packet.tail.kind is TailKind.MAC and packet.tail.mac.key_id == 0


def test_v4_crypto_nak():
    assert parse(header() + bytes(4)).tail.kind is TailKind.CRYPTO_NAK


@pytest.mark.parametrize("digest_len", [16, 20])
def test_v4_bare_mac(digest_len):
    packet = parse(header() + struct.pack("!I", 42) + bytes(digest_len))
    assert packet.tail.kind is TailKind.MAC and packet.tail.mac.key_id == 42


def test_v4_extension_field_then_mac():
    ef = struct.pack("!HH", 0x0104, 36) + bytes(32)
    packet = parse(header() + ef + struct.pack("!I", 5) + bytes(16))
    assert packet.tail.kind is TailKind.EXTENSIONS
    assert packet.tail.extension_fields[0].field_type == 0x0104
    assert packet.tail.mac.key_id == 5 and packet.tail.mac.offset == 48 + 36


def test_v4_long_sha512_style_mac_from_old_chrony():
    packet = parse(header() + struct.pack("!I", 9) + bytes(64))
    assert packet.tail.kind is TailKind.MAC and len(packet.tail.mac.digest) == 64


def test_v4_short_tail_that_is_no_extension_field_reads_as_long_mac():
    # chrony 4.3: 25-68 trailing bytes that are not a valid field are an old long MAC.
    assert parse(header() + struct.pack("!HH", 1, 12) + bytes(28)).tail.kind is TailKind.MAC


def test_v4_bad_extension_field_length():
    with pytest.raises(MalformedPacket) as caught:
        parse(header() + struct.pack("!HH", 1, 12) + bytes(96))
    assert caught.value.reason == "ext_field"


def test_kiss_code_and_refid_text():
    kod = parse(encode(NtpPacket(mode=Mode.SERVER, stratum=0, refid=b"RATE")))
    assert kod.is_kiss_of_death and kod.kiss_code == "RATE"
    assert refid_to_text(bytes([192, 0, 2, 1]), 2) == "192.0.2.1"
    assert refid_to_text(b"GPS\0", 1) == "GPS"
