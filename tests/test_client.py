"""The SNTP client's judgement of replies (pure) and its CLI."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from guardntp import client
from guardntp.cli import main
from guardntp.timestamps import NS_PER_S, unix_ns_to_ntp
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
    ({"origin_ts": XMT + 1}, "origin"),
    ({"mode": Mode.SYMMETRIC_PASSIVE}, "mode"),
    ({"leap": Leap.UNSYNCHRONIZED}, "not synchronised"),
    ({"stratum": 0, "refid": b"\0\0\0\0", "leap": Leap.UNSYNCHRONIZED}, "not synchronised"),
    ({"transmit_ts": 0}, "empty"),
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
    """A one-shot UDP server on loopback that replies with ``answer(request)``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve():
        try:
            data, address = sock.recvfrom(1024)
            for packet in answer(data):
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
        now = unix_ns_to_ntp(__import__("time").time_ns())
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
    (["query", "127.0.0.1:1", "--samples", "0"], "--samples"),
    (["query"], "required"),
])
def test_cli_bad_arguments_get_a_message_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_no_answer_is_a_clean_failure(capsys):
    port = _fake_server(lambda request: [])
    assert main(["query", f"127.0.0.1:{port}", "--timeout", "0.3"]) == 1
    assert "no reply" in capsys.readouterr().err
