"""``guardntp query``: one JSON object and a distinct exit status for every outcome.

Every server here is a scripted UDP socket on 127.0.0.1 (or a real chronyd on a
loopback port); nothing leaves the machine.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, chronyd_running, free_udp_port, needs_chronyd, wait_until_answering

from guardntp import client
from guardntp.cli import main
from guardntp.commands.query import EXIT_STATUS
from guardntp.timestamps import NS_PER_S, ns_to_short, unix_ns_to_ntp
from guardntp.wire import Leap, Mode, NtpPacket, encode


def scripted_server(script: Callable[[bytes], list[bytes]]) -> int:
    """A UDP server on loopback answering the first request with ``script(request)``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def serve() -> None:
        try:
            data, address = sock.recvfrom(1024)
            for packet in script(data):
                sock.sendto(packet, address)
        except OSError:
            pass
        finally:
            sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(sock.getsockname()[1])


def answer(request: bytes, offset_s: float = 0.0, **fields: object) -> bytes:
    now = unix_ns_to_ntp(time.time_ns() + int(offset_s * NS_PER_S))
    base: dict[str, object] = dict(mode=Mode.SERVER, stratum=2, refid=bytes([192, 0, 2, 1]),
                                   origin_ts=int.from_bytes(request[40:48], "big"),
                                   receive_ts=now, transmit_ts=now, root_delay=ns_to_short(
                                       10_000_000), root_dispersion=ns_to_short(20_000_000))
    base.update(fields)
    return encode(NtpPacket(**base))  # type: ignore[arg-type]


def strays(request: bytes) -> list[bytes]:
    good = answer(request)
    return [answer(request, mode=Mode.BROADCAST), good[:47],
            answer(request, origin_ts=int.from_bytes(request[40:48], "big") ^ 1)]


def run_query(capsys: pytest.CaptureFixture[str], port: int, *extra: str,
              ) -> tuple[int, dict[str, object], str]:
    status = main(["query", f"127.0.0.1:{port}", "--json", "--timeout", "2", *extra])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1, captured.out    # one JSON object, whatever happened
    report = json.loads(lines[0])
    assert report["exit_status"] == status and report["server"] == f"127.0.0.1:{port}"
    assert "Traceback" not in captured.err
    return status, report, captured.err


def test_exit_statuses_are_distinct():
    assert len(set(EXIT_STATUS.values())) == len(EXIT_STATUS)
    assert 2 not in EXIT_STATUS.values()   # usage errors keep 2
    assert EXIT_STATUS["ok"] == 0 and EXIT_STATUS["kod"] == 3


def test_ok_reports_strays(capsys):
    port = scripted_server(lambda request: [*strays(request), answer(request)])
    status, report, err = run_query(capsys, port)
    assert status == 0 and report["outcome"] == "ok" and err == ""
    assert report["stratum"] == 2 and report["refid"] == "192.0.2.1" and report["leap"] == "none"
    assert abs(report["offset"]) < 1 and report["panic"] is False and report["warnings"] == []
    assert report["ignored"] == {"malformed": 1, "wrong_mode": 1, "wrong_origin": 1}
    assert report["root_distance"] == pytest.approx(0.025, abs=0.01)


def test_ok_text_output_says_how_many_strays_were_ignored(capsys):
    port = scripted_server(lambda request: [strays(request)[2], strays(request)[2],
                                            answer(request)])
    assert main(["query", f"127.0.0.1:{port}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "2 stray datagrams ignored (wrong origin)"


def test_ok_beyond_the_panic_threshold_is_shown_and_flagged(capsys):
    port = scripted_server(lambda request: [answer(request, offset_s=2000)])
    status, report, err = run_query(capsys, port)
    assert status == 0 and report["outcome"] == "ok" and report["panic"] is True
    assert report["offset"] == pytest.approx(2000, abs=1)
    assert report["warnings"] == [f"offset {report['offset']:+.3f} s is beyond the 1000 s "
                                  "panic threshold"]
    assert err == f"guardntp: warning: 127.0.0.1:{port}: {report['warnings'][0]}\n"
    port = scripted_server(lambda request: [answer(request, offset_s=-2000)])
    assert main(["query", f"127.0.0.1:{port}"]) == 0
    captured = capsys.readouterr()
    assert "** beyond the panic threshold **" in captured.out.splitlines()[1]
    assert "panic threshold" in captured.err


@pytest.mark.parametrize("fields,reason", [
    ({"root_dispersion": ns_to_short(16 * NS_PER_S)},
     "root dispersion 16.000 s is not below the 16 s maximum"),
    ({"root_delay": 0xFFFF_FFFF},
     "root delay 65536.000 s puts the root distance past the 16 s maximum"),
    ({"root_delay": ns_to_short(2 * NS_PER_S), "root_dispersion": ns_to_short(2 * NS_PER_S)},
     "root distance 3."),
    ({"leap": Leap.UNSYNCHRONIZED, "stratum": 0, "refid": bytes(4)},
     "server is not synchronised (LI=3, stratum 0 without a kiss code, refid 0x00000000)"),
    ({"stratum": 0, "refid": bytes(4)},
     "server is not synchronised (stratum 0 without a kiss code, refid 0x00000000)"),
    ({"stratum": 16}, "server is not synchronised (stratum 16)"),
])
def test_rejected_names_the_value(capsys, fields, reason):
    port = scripted_server(lambda request: [answer(request, **fields)])
    status, report, err = run_query(capsys, port)
    assert status == EXIT_STATUS["rejected"] == 5 and report["outcome"] == "rejected"
    assert str(report["reason"]).startswith(reason), report
    assert err == f"guardntp: 127.0.0.1:{port}: rejected reply: {report['reason']}\n"
    assert report["message"] == err[len("guardntp: "):-1]
    reply = report["reply"]
    assert isinstance(reply, dict) and "root_dispersion" in reply and "stratum" in reply


def test_kod_reports_the_code(capsys):
    port = scripted_server(lambda request: [
        *strays(request), answer(request, stratum=0, refid=b"RATE", leap=Leap.UNSYNCHRONIZED)])
    status, report, err = run_query(capsys, port, "--samples", "3")
    assert status == EXIT_STATUS["kod"] == 3 and report["outcome"] == "kod"
    assert report["kod"] == "RATE" and report["meaning"].startswith("rate exceeded")
    assert report["ignored"] == {"malformed": 1, "wrong_mode": 1, "wrong_origin": 1}
    assert "sent Kiss-o'-Death RATE" in err and "not retrying" in err


def test_no_reply(capsys):
    port = scripted_server(strays)
    status, report, err = run_query(capsys, port, "--timeout", "0.4")
    assert status == EXIT_STATUS["no_reply"] == 4 and report["outcome"] == "no_reply"
    assert report["ignored"] == {"malformed": 1, "wrong_mode": 1, "wrong_origin": 1}
    assert report["message"] == (f"no reply from 127.0.0.1:{port} within 0.4 s; 3 stray "
                                 "datagrams ignored (1 malformed, 1 wrong mode, 1 wrong "
                                 "origin), last: reply with wrong origin")
    assert err == f"guardntp: {report['message']}\n"


def test_resolve_error(capsys, monkeypatch):
    # No DNS query may leave the machine: getaddrinfo answers as a resolver would.
    def no_such_name(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(client.socket, "getaddrinfo", no_such_name)
    status = main(["query", "ntp.example.invalid", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == EXIT_STATUS["resolve_error"] == 6 and report["outcome"] == "resolve_error"
    assert report["message"] == ("ntp.example.invalid: cannot resolve ntp.example.invalid: "
                                 "Name or service not known")
    assert report["exit_status"] == 6 and captured.err == f"guardntp: {report['message']}\n"


def test_an_invalid_host_name_is_a_resolve_error_not_a_traceback(capsys):
    # The IDNA codec refuses a 64-byte label before any lookup is made.
    status = main(["query", "a" * 64 + ".example", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 6 and "invalid host name" in report["message"]


def test_local_error(capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(client, "exchange", unreachable)
    status = main(["query", "192.0.2.1", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == EXIT_STATUS["error"] == 1 and report["outcome"] == "error"
    assert report["message"] == "192.0.2.1: Network is unreachable"


def test_usage_errors_keep_status_2_and_print_no_json(capsys):
    assert main(["query", "127.0.0.1:1", "--json", "--samples", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--samples must be 1-64" in captured.err


def test_help_and_docs_list_every_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    help_text = capsys.readouterr().out
    docs = (REPO / "docs" / "operations.md").read_text()
    documented = dict(re.findall(r"^\| (\d) \| `(\w+)` \|", docs, re.MULTILINE))
    for name, status in EXIT_STATUS.items():
        assert re.search(rf"^  {status}  {name} ", help_text, re.MULTILINE), name
        assert documented.get(str(status)) == name, (name, documented)
    assert re.search(r"^  2  \(usage\)", help_text, re.MULTILINE)


@needs_chronyd
def test_ok_against_a_real_chronyd(tmp_path: Path, capsys):
    port = free_udp_port()
    with chronyd_running(tmp_path / "chrony", f"port {port}\nbindaddress 127.0.0.1\n"
                         "allow 127.0.0.0/8\nlocal stratum 8\ncmdport 0"):
        wait_until_answering(port)
        status, report, err = run_query(capsys, port)
    assert status == 0 and report["outcome"] == "ok", (report, err)
    assert report["stratum"] == 8 and report["leap"] == "none" and report["ignored"] == {}
    assert abs(report["offset"]) < 0.001 and report["panic"] is False
