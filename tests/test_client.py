"""The SNTP client's judgement of replies (pure) and its CLI."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from conftest import free_udp_port

from guardntp import client
from guardntp.cli import main
from guardntp.timestamps import NS_PER_S, ns_to_short, unix_ns_to_ntp
from guardntp.wire import Leap, Mode, NtpPacket, encode

T1 = 1_800_000_000 * NS_PER_S
XMT = 0x0123_4567_89AB_CDEF


def pending(mode=Mode.CLIENT):
    return client.build_request(XMT, mode=mode)


def reply(**fields):
    base = dict(mode=Mode.SERVER, stratum=2, origin_ts=XMT,
                receive_ts=unix_ns_to_ntp(T1 + 5 * NS_PER_S + 1_000_000),
                transmit_ts=unix_ns_to_ntp(T1 + 5 * NS_PER_S + 2_000_000),
                refid=bytes([192, 0, 2, 1]))
    base.update(fields)
    return encode(NtpPacket(**base))


def test_request_is_data_minimised():
    request = pending().wire
    assert len(request) == 48 and request[0] == 0x23
    assert request[1:40] == bytes(39) and int.from_bytes(request[40:], "big") == XMT


def test_offset_and_delay():
    # Server 5 s ahead; 1 ms each way; 1 ms in the server.
    sample = client.evaluate_reply(reply(), pending(), T1, T1 + 3_000_000)
    assert abs(sample.offset_ns - 5 * NS_PER_S) < 10
    assert abs(sample.delay_ns - 2_000_000) < 10


@pytest.mark.parametrize("fields,message", [
    ({"origin_ts": XMT + 1}, "origin timestamp does not match"),
    ({"mode": Mode.SYMMETRIC_PASSIVE}, r"mode 2 \(symmetric passive\), expected 4 \(server\)"),
    ({"leap": Leap.UNSYNCHRONIZED}, r"^server is not synchronised \(LI=3\)$"),
    ({"stratum": 0, "refid": b"\0\0\0\0", "leap": Leap.UNSYNCHRONIZED},
     r"^server is not synchronised \(LI=3, stratum 0 without a kiss code, refid 0x00000000\)$"),
    # What used to be described as "LI=3 or stratum 16" although LI was 0.
    ({"stratum": 0, "refid": b"\0\0\0\0"},
     r"^server is not synchronised \(stratum 0 without a kiss code, refid 0x00000000\)$"),
    ({"stratum": 16}, r"^server is not synchronised \(stratum 16\)$"),
    ({"stratum": 200}, r"\(stratum 200, above 16\)$"),
    ({"transmit_ts": 0}, "^server left its transmit timestamp empty$"),
    ({"transmit_ts": 0, "receive_ts": 0},
     "^server left its receive and transmit timestamps empty$"),
])
def test_bogus_replies_rejected(fields, message):
    with pytest.raises(client.BogusReply, match=message):
        client.evaluate_reply(reply(**fields), pending(), T1, T1 + 3_000_000)


def test_kod_recognised():
    with pytest.raises(client.KissOfDeath) as caught:
        client.evaluate_reply(reply(stratum=0, refid=b"RATE", leap=Leap.UNSYNCHRONIZED),
                              pending(), T1, T1)
    assert caught.value.code == "RATE"


def test_symmetric_request_expects_mode_2():
    sample = client.evaluate_reply(reply(mode=Mode.SYMMETRIC_PASSIVE),
                                   pending(Mode.SYMMETRIC_ACTIVE), T1, T1 + 3_000_000)
    assert sample.stratum == 2


def _fake_server(answer):
    """A one-shot UDP server on loopback that replies with ``answer(request)``, in order."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve():
        try:
            data, address = sock.recvfrom(1024)
            for packet in answer(data):
                if isinstance(packet, tuple):   # ("other", bytes): from another port
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                        other.sendto(packet[1], address)
                else:
                    sock.sendto(packet, address)
        except OSError:
            pass
        finally:
            sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


def test_cli_kod_exits_3_without_retrying(capsys):
    def kod(request):
        return [encode(NtpPacket(mode=Mode.SERVER, stratum=0, refid=b"RATE",
                                 leap=Leap.UNSYNCHRONIZED,
                                 origin_ts=int.from_bytes(request[40:48], "big")))]
    port = _fake_server(kod)
    # --samples 3: a KoD must end the run at once (the fake server answers only once,
    # so a retry would time out and change the exit status).
    assert main(["query", f"127.0.0.1:{port}", "--samples", "3"]) == 3
    assert "Kiss-o'-Death RATE" in capsys.readouterr().err


def test_cli_ignores_a_forged_reply_and_takes_the_real_one(capsys):
    def forged_then_real(request):
        xmt = int.from_bytes(request[40:48], "big")
        now = unix_ns_to_ntp(time.time_ns())
        return [encode(NtpPacket(mode=Mode.SERVER, stratum=1, origin_ts=xmt ^ 1,
                                 receive_ts=now + (100 << 32), transmit_ts=now + (100 << 32))),
                encode(NtpPacket(mode=Mode.SERVER, stratum=1, refid=b"GPS\0", origin_ts=xmt,
                                 receive_ts=now, transmit_ts=now))]
    port = _fake_server(forged_then_real)
    assert main(["query", f"127.0.0.1:{port}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stratum"] == 1 and report["refid"] == "GPS" and abs(report["offset"]) < 1


@pytest.mark.parametrize("argv,message", [
    (["query", "127.0.0.1:99999"], "expected HOST"),
    (["query", "[::1"], "expected HOST"),
    (["query", "[::1]x"], "expected HOST"),
    (["query", "127.0.0.1:1", "--samples", "0"], "--samples"),
    (["query"], "required"),
    # an empty path (an unset shell variable) is refused, not taken as "not given"
    (["query", "127.0.0.1:1", "--key-file", ""], "--key-file: the path is empty"),
    (["block", "list", "--state-dir", ""], "--state-dir: the path is empty"),
    (["stats", "--state-dir", " "], "--state-dir: the path is empty"),
    (["serve", "--state-dir", ""], "--state-dir: the path is empty"),
    (["serve", "--key-file", ""], "--key-file: the path is empty"),
])
def test_cli_bad_arguments_get_a_message_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_no_answer_is_a_clean_failure(capsys):
    port = _fake_server(lambda request: [])
    assert main(["query", f"127.0.0.1:{port}", "--timeout", "0.3"]) == 4
    assert capsys.readouterr().err == f"guardntp: no reply from 127.0.0.1:{port} within 0.3 s\n"


# ----------------------------------------------------------------------------- strays

def origin_of(request: bytes) -> int:
    return int.from_bytes(request[40:48], "big")


def genuine(request: bytes, **fields) -> bytes:
    now = unix_ns_to_ntp(time.time_ns())
    base = dict(mode=Mode.SERVER, stratum=1, refid=b"GPS\0", origin_ts=origin_of(request),
                receive_ts=now, transmit_ts=now)
    base.update(fields)
    return encode(NtpPacket(**base))


def strays(request: bytes) -> list[bytes]:
    """A spoofed broadcast, a 47-byte datagram and a reply with the wrong origin."""
    now = unix_ns_to_ntp(time.time_ns())
    return [
        encode(NtpPacket(mode=Mode.BROADCAST, stratum=1, origin_ts=origin_of(request),
                         receive_ts=now, transmit_ts=now + (500 << 32))),
        genuine(request)[:47],
        genuine(request, origin_ts=origin_of(request) ^ 1, transmit_ts=now + (900 << 32)),
    ]


def test_stray_reason_names_what_was_seen():
    request = pending()
    assert client.stray_reason(reply(), request) is None
    assert client.stray_reason(reply()[:47], request) == ("malformed", "47-byte datagram (short)")
    assert client.stray_reason(reply() + b"\0", request)[0] == "malformed"
    assert client.stray_reason(reply(mode=Mode.BROADCAST), request) == (
        "wrong_mode", "mode 5 (broadcast) packet")
    assert client.stray_reason(reply(mode=Mode.CLIENT), request)[0] == "wrong_mode"
    assert client.stray_reason(reply(origin_ts=XMT ^ 1), request) == (
        "wrong_origin", "reply with wrong origin")
    # A KoD is a reply like any other: only its origin makes it ours.
    kod = reply(stratum=0, refid=b"RATE", leap=Leap.UNSYNCHRONIZED)
    assert client.stray_reason(kod, request) is None
    assert client.stray_reason(reply(mode=Mode.SYMMETRIC_PASSIVE),
                               pending(Mode.SYMMETRIC_ACTIVE)) is None


def test_exchange_stats_describe_and_add():
    assert client.ExchangeStats().describe() == "" and client.ExchangeStats().ignored == 0
    two = client.ExchangeStats(wrong_origin=2)
    assert two.describe() == "2 stray datagrams ignored (wrong origin)"
    mixed = two + client.ExchangeStats(malformed=1, wrong_mode=1)
    assert mixed.counts() == {"malformed": 1, "wrong_mode": 1, "wrong_origin": 2}
    assert mixed.describe() == ("4 stray datagrams ignored (1 malformed, 1 wrong mode, "
                                "2 wrong origin)")
    assert client.ExchangeStats(port_unreachable=1).describe() == (
        "1 stray datagram ignored (ICMP port unreachable)")


def test_exchange_survives_strays_before_the_genuine_reply():
    port = _fake_server(lambda request: [*strays(request), genuine(request)])
    sample = client.exchange("127.0.0.1", port, timeout_s=3)
    assert sample.packet.refid == b"GPS\0" and abs(sample.offset_ns) < NS_PER_S
    assert sample.stats == client.ExchangeStats(malformed=1, wrong_mode=1, wrong_origin=1)


def test_exchange_ends_with_a_genuine_kod_after_strays():
    port = _fake_server(lambda request: [
        *strays(request), genuine(request, stratum=0, refid=b"DENY", leap=Leap.UNSYNCHRONIZED)])
    with pytest.raises(client.KissOfDeath) as caught:
        client.exchange("127.0.0.1", port, timeout_s=3)
    assert caught.value.code == "DENY" and caught.value.stats.ignored == 3


def test_exchange_ignores_a_forged_kod():
    port = _fake_server(lambda request: [
        genuine(request, stratum=0, refid=b"RATE", leap=Leap.UNSYNCHRONIZED,
                origin_ts=origin_of(request) + 1), genuine(request)])
    sample = client.exchange("127.0.0.1", port, timeout_s=3)
    assert sample.stratum == 1 and sample.stats == client.ExchangeStats(wrong_origin=1)


def test_exchange_with_only_strays_times_out_and_says_what_came():
    port = _fake_server(strays)
    with pytest.raises(client.NoReply) as caught:
        client.exchange("127.0.0.1", port, timeout_s=0.5)
    assert isinstance(caught.value, TimeoutError) and caught.value.stats.ignored == 3
    assert str(caught.value) == (
        f"no reply from 127.0.0.1:{port} within 0.5 s; 3 stray datagrams ignored "
        "(1 malformed, 1 wrong mode, 1 wrong origin), last: reply with wrong origin")


def test_a_datagram_from_another_port_never_reaches_the_exchange():
    # The socket is connected: the kernel drops what does not come from the server.
    def from_elsewhere(request):
        return [("other", genuine(request, refid=b"EVIL")), genuine(request)]
    port = _fake_server(from_elsewhere)
    sample = client.exchange("127.0.0.1", port, timeout_s=3)
    assert sample.packet.refid == b"GPS\0" and sample.stats == client.NO_STRAYS


def test_same_peer_ignores_scope_and_spelling():
    assert client.same_peer(("127.0.0.1", 123), ("127.0.0.1", 123))
    assert not client.same_peer(("127.0.0.1", 124), ("127.0.0.1", 123))
    assert not client.same_peer(("127.0.0.2", 123), ("127.0.0.1", 123))
    assert client.same_peer(("fe80::1%lo", 123, 0, 1), ("fe80:0::1", 123, 0, 1))


def test_icmp_port_unreachable_does_not_end_the_exchange():
    closed = free_udp_port()
    with pytest.raises(client.NoReply) as caught:
        client.exchange("127.0.0.1", closed, timeout_s=0.3)
    assert caught.value.stats == client.ExchangeStats(port_unreachable=1)
    assert str(caught.value) == (f"no reply from 127.0.0.1:{closed} within 0.3 s; 1 stray "
                                 "datagram ignored (ICMP port unreachable)")


def test_a_timeout_after_one_kind_of_stray_shows_the_last_one_when_it_says_more():
    port = _fake_server(lambda request: strays(request)[1:2])
    with pytest.raises(client.NoReply) as caught:
        client.exchange("127.0.0.1", port, timeout_s=0.3)
    assert str(caught.value).endswith("; 1 stray datagram ignored (malformed), last: 47-byte "
                                      "datagram (short)")


# ----------------------------------------------------------------------------- sanity limits

def sample_with(root_delay_s: float = 0.0, root_dispersion_s: float = 0.0, delay_ns: int = 0,
                offset_ns: int = 0) -> client.Sample:
    packet = NtpPacket(mode=Mode.SERVER, stratum=2,
                       root_delay=ns_to_short(int(root_delay_s * NS_PER_S)),
                       root_dispersion=ns_to_short(int(root_dispersion_s * NS_PER_S)))
    return client.Sample(offset_ns, delay_ns, packet)


def test_sanity_limits_are_chronys():
    assert client.MAX_ROOT_DISTANCE_NS == 3 * NS_PER_S          # chrony's maxdistance
    assert client.MAX_ROOT_DISPERSION_NS == 16 * NS_PER_S       # RFC 5905 MAXDISP
    assert client.PANIC_THRESHOLD_NS == 1000 * NS_PER_S         # ntpd's panic threshold


@pytest.mark.parametrize("sample,reason", [
    (sample_with(root_dispersion_s=16), "root dispersion 16.000 s is not below the 16 s maximum"),
    (sample_with(root_delay_s=65536), "root delay 65536.000 s puts the root distance past the "
                                      "16 s maximum"),
    (sample_with(root_delay_s=2, root_dispersion_s=2.5),
     "root distance 3.500 s exceeds 3 s (root delay 2.000 s, root dispersion 2.500 s)"),
    # Our own round trip counts too: half of it.
    (sample_with(root_dispersion_s=2.9, delay_ns=400_000_000),
     "root distance 3.100 s exceeds 3 s (root delay 0.000 s, root dispersion 2.900 s, "
     "round trip 0.400 s)"),
])
def test_unusable_samples_name_the_value(sample, reason):
    assert client.usable(sample) == reason


def test_usable_sample_within_the_limits():
    assert client.usable(sample_with(root_delay_s=0.05, root_dispersion_s=2.9)) is None
    assert client.root_distance_problem(0, 3 * NS_PER_S) is None
    assert client.root_distance_problem(0, 3 * NS_PER_S + 1) is not None


def test_panic_threshold_warns_beyond_1000_s_either_way():
    assert client.panic_warning(sample_with(offset_ns=1000 * NS_PER_S)) is None
    assert client.panic_warning(sample_with(offset_ns=-1001 * NS_PER_S)) == (
        "offset -1001.000 s is beyond the 1000 s panic threshold")
