"""``guardntp query HOST --nts``: NTS-KE, then NTS-authenticated exchanges, one outcome
and exit status per failure.

Servers are on loopback only: guardntp's own NTS-KE server with the test responder of
``tests/test_nts_chronyd.py`` (``NtsUdpResponder``, built on the pure
``responder.answer``), and a real chronyd 4.3 serving NTS. Every wait is bounded by
``--timeout``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    chronyd_nts_server_config,
    chronyd_running,
    free_tcp_port,
    free_udp_port,
    needs_chronyd,
    wait_until_answering,
)
from test_nts_chronyd import OLD, OTHER, NtsUdpResponder
from test_nts_ke import make_certs

from guardntp import client
from guardntp.cli import main
from guardntp.commands.query import EXIT_STATUS
from guardntp.nts import aead
from guardntp.nts.cookies import MasterKeys
from guardntp.nts.ke_client import explain_response
from guardntp.nts.ke_server import KeServer
from guardntp.nts.records import END_OF_MESSAGE, ERROR, KeSettings, Record

Certs = tuple[Path, Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("nts-query-certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("nts-query-other"), ca_name="another CA")[0]


@pytest.fixture(autouse=True)
def quick_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "SAMPLE_SPACING_S", 0.05)


class _StraysFirst:
    """A socket whose ``sendto`` sends three strays before each real datagram: one with
    a flipped origin, one cut to 47 bytes, one turned into a broadcast (mode 5)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        flipped = bytearray(data)
        flipped[31] ^= 1
        broadcast = bytearray(data)
        broadcast[0] = (broadcast[0] & ~7) | 5
        for stray in (bytes(flipped), data[:47], bytes(broadcast)):
            self._sock.sendto(stray, address)
        return self._sock.sendto(data, address)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@contextlib.contextmanager
def nts_servers(certs: Certs, responder_keys: MasterKeys | None = None, tamper: bool = False,
                strays: bool = False, settings: KeSettings | None = None,
                ke_keys: object = None, listen: str = "127.0.0.1",
                ) -> Iterator[tuple[KeServer, NtsUdpResponder]]:
    """guardntp's NTS-KE server pointing (Port Negotiation) at the test NTS responder."""
    _, cert, key = certs
    with NtsUdpResponder(responder_keys or MasterKeys.of((OLD,)), tamper=tamper) as udp:
        if strays:
            udp.sock = _StraysFirst(udp.sock)  # type: ignore[assignment]
        ke = KeServer((listen, 0), cert, key,
                      ke_keys or (lambda: MasterKeys.of((OLD,))),  # type: ignore[arg-type]
                      settings or KeSettings(ntp_port=udp.port))
        ke.start()
        try:
            yield ke, udp
        finally:
            ke.stop()


def query_nts(capsys: pytest.CaptureFixture[str], ke_port: int, ca: Path, *extra: str,
              host: str = "127.0.0.1") -> tuple[int, dict[str, object], str]:
    status = main(["query", host, "--nts", "--nts-ca", str(ca), "--nts-port", str(ke_port),
                   "--json", "--timeout", "2", *extra])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1, captured.out    # one JSON object, whatever happened
    report = json.loads(lines[0])
    assert report["exit_status"] == status and report["server"] == host
    assert "Traceback" not in captured.err
    if status:
        assert captured.err == f"guardntp: {report['message']}\n"
    return status, report, captured.err


def test_ok_json_says_nts_and_ignores_strays(capsys, certs):
    with nts_servers(certs, strays=True) as (ke, udp):
        ke_port = ke.address[1]
        status, report, err = query_nts(capsys, ke_port, certs[0])
    assert status == 0 and report["outcome"] == "ok" and err == "", report
    assert report["authenticated"] == "nts"
    assert report["nts"] == {"ke_server": f"127.0.0.1:{ke_port}",
                             "ntp_server": f"127.0.0.1:{udp.port}",
                             "aead": "AEAD_AES_SIV_CMAC_256", "cookies_from_ke": 8,
                             "cookies_from_replies": 1}
    assert report["ignored"] == {"malformed": 1, "wrong_mode": 1, "wrong_origin": 1}
    assert report["stratum"] == 1 and report["refid"] == "GPS" and abs(report["offset"]) < 1
    assert udp.counters.snapshot()["nts_answered"] == 1 and udp.plain == 0


def test_ok_text_says_nts_authenticated(capsys, certs):
    with nts_servers(certs) as (ke, udp):
        ke_port = ke.address[1]
        status = main(["query", "127.0.0.1", "--nts", "--nts-ca", str(certs[0]),
                       "--nts-port", str(ke_port)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert (f"NTS-authenticated: NTS-KE 127.0.0.1:{ke_port} (AEAD_AES_SIV_CMAC_256), "
            f"NTP server 127.0.0.1:{udp.port}, cookies received: 8 from NTS-KE, 1 in "
            "replies") in out.splitlines()


def test_each_sample_spends_a_cookie_and_placeholders_refill_the_pool(capsys, certs):
    # Two cookies from NTS-KE: the first request sends one and six placeholders, so its
    # reply brings seven and the pool is back at eight; then one for one.
    with nts_servers(certs) as (ke, udp):
        ke_port = ke.address[1]
        ke.reconfigure(settings=KeSettings(ntp_port=udp.port, cookies=2))
        status, report, _ = query_nts(capsys, ke_port, certs[0], "--samples", "3")
    assert status == 0 and report["samples"] == 3, report
    nts = report["nts"]
    assert isinstance(nts, dict)
    assert nts["cookies_from_ke"] == 2 and nts["cookies_from_replies"] == 7 + 1 + 1
    assert udp.counters.snapshot()["nts_answered"] == 3
    assert all(reply <= request for request, reply in udp.sizes)


def test_nts_nak_is_a_kod_ntsn(capsys, certs):
    # The responder does not know the key of the cookies NTS-KE made.
    with nts_servers(certs, responder_keys=MasterKeys.of((OTHER,))) as (ke, udp):
        ke_port = ke.address[1]
        status, report, err = query_nts(capsys, ke_port, certs[0], "--samples", "3")
    assert status == EXIT_STATUS["kod"] == 3 and report["outcome"] == "kod", report
    assert report["kod"] == "NTSN" and "negative acknowledgement" in str(report["meaning"])
    assert (f"sent Kiss-o'-Death NTSN (NTS NAK: the NTP server 127.0.0.1:{udp.port} did not "
            f"accept the cookies from NTS-KE 127.0.0.1:{ke_port}); not retrying") in err
    assert udp.counters.snapshot()["nts_nak_cookie_unknown_key"] == 1  # never retried
    assert "authenticated" not in report


def test_an_authenticator_that_does_not_verify_is_rejected(capsys, certs):
    with nts_servers(certs, tamper=True) as (ke, _):
        ke_port = ke.address[1]
        status, report, err = query_nts(capsys, ke_port, certs[0])
    assert status == EXIT_STATUS["rejected"] == 5 and report["outcome"] == "rejected"
    assert report["reason"] == "NTS: reply authenticator does not verify under the S2C key"
    assert err == (f"guardntp: 127.0.0.1: rejected reply: {report['reason']}\n")
    assert isinstance(report["reply"], dict) and report["reply"]["stratum"] == 1


def test_a_plain_reply_to_an_nts_request_is_rejected(capsys, certs):
    def plain(request: bytes) -> list[bytes]:
        origin = request[40:48]
        now = struct.pack("!Q", 0xE000_0000_0000_0000)
        return [bytes([0x24, 2, 0, 0xEC]) + bytes(8) + b"\xc0\x00\x02\x01" + now + origin
                + now + now]

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(5)
        port = int(udp.getsockname()[1])
        with nts_servers(certs, settings=KeSettings(ntp_port=port)) as (ke, _):
            ke_port = ke.address[1]
            def serve() -> None:
                with contextlib.suppress(OSError):
                    data, address = udp.recvfrom(4096)
                    for reply in plain(data):
                        udp.sendto(reply, address)

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            status, report, _ = query_nts(capsys, ke_port, certs[0])
            thread.join(5)
    assert status == 5 and report["reason"] == ("reply is not NTS-authenticated (no "
                                                "extension fields)"), report


def test_an_untrusted_certificate_fails_nts_ke(capsys, certs, other_ca):
    with nts_servers(certs) as (ke, udp):
        ke_port = ke.address[1]
        status, report, err = query_nts(capsys, ke_port, other_ca)
    assert status == EXIT_STATUS["nts_ke_failed"] == 7 and report["outcome"] == "nts_ke_failed"
    assert report["nts"] == {"ke_server": f"127.0.0.1:{ke_port}",
                             "ke_failure": "untrusted"}
    assert report["message"] == (f"127.0.0.1: NTS-KE 127.0.0.1:{ke_port}: TLS handshake "
                                 "failed: certificate not trusted (self-signed certificate "
                                 "in certificate chain)")
    assert udp.counters.snapshot().get("nts_answered", 0) == 0


def test_a_certificate_for_another_name_fails_nts_ke(capsys, certs):
    # The certificate names localhost and 127.0.0.1; 127.0.0.2 is loopback too (Linux).
    with nts_servers(certs, listen="127.0.0.2") as (ke, _):
        ke_port = ke.address[1]
        status, report, _ = query_nts(capsys, ke_port, certs[0], host="127.0.0.2")
    assert status == 7 and report["nts"]["ke_failure"] == "name", report
    assert report["message"] == (f"127.0.0.2: NTS-KE 127.0.0.2:{ke_port}: certificate "
                                 "is not for 127.0.0.2")


@pytest.mark.parametrize("settings,keys,kind,why", [
    (KeSettings(cookies=0), None, "no_cookies", "server sent no cookies"),
    (KeSettings(algorithms=(aead.AES_SIV_CMAC_512,)), None, "no_aead",
     "no common AEAD algorithm (we offer AEAD_AES_SIV_CMAC_256)"),
    (None, "broken", "error_record", "server sent an Error record: internal server error (2)"),
])
def test_nts_ke_refusals(capsys, certs, settings, keys, kind, why):
    def no_keys() -> MasterKeys:
        raise OSError("no key file")

    with nts_servers(certs, settings=settings,
                     ke_keys=no_keys if keys == "broken" else None) as (ke, _):
        ke_port = ke.address[1]
        status, report, _ = query_nts(capsys, ke_port, certs[0])
    assert status == 7 and report["nts"]["ke_failure"] == kind, report
    assert report["message"] == f"127.0.0.1: NTS-KE 127.0.0.1:{ke_port}: {why}"


def test_explain_a_bad_request_error_record():
    records = [Record(ERROR, b"\x00\x01", critical=True), Record(END_OF_MESSAGE, critical=True)]
    assert explain_response(records, "ke_error_1") == (
        "error_record", "server sent an Error record: bad request (1)")


def test_nts_ke_connection_refused(capsys, certs):
    port = free_tcp_port()
    status, report, _ = query_nts(capsys, port, certs[0])
    assert status == 7 and report["nts"]["ke_failure"] == "connect", report
    assert report["message"] == f"127.0.0.1: NTS-KE 127.0.0.1:{port}: Connection refused"


def test_nts_ke_timeout_is_no_reply(capsys, certs):
    # The kernel completes the TCP handshake (backlog), nobody ever speaks TLS.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = int(silent.getsockname()[1])
        status, report, _ = query_nts(capsys, port, certs[0], "--timeout", "0.5")
    assert status == EXIT_STATUS["no_reply"] == 4 and report["outcome"] == "no_reply"
    assert report["nts"]["ke_failure"] == "timeout"
    assert report["message"] == f"127.0.0.1: NTS-KE 127.0.0.1:{port}: TLS handshake timed out"


def test_ntp_timeout_after_nts_ke_is_no_reply(capsys, certs):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = int(silent.getsockname()[1])
        with nts_servers(certs, settings=KeSettings(ntp_port=port)) as (ke, _):
            ke_port = ke.address[1]
            status, report, _ = query_nts(capsys, ke_port, certs[0], "--timeout", "0.3",
                                          "--samples", "2")
    assert status == 4 and report["outcome"] == "no_reply", report
    assert report["message"] == f"no reply from 127.0.0.1:{port} within 0.3 s"
    assert report["nts"]["ntp_server"] == f"127.0.0.1:{port}"
    assert report["nts"]["cookies_from_replies"] == 0


@pytest.mark.parametrize("argv,message", [
    (["--nts", "--key-id", "1"], "--nts and --key-id/--key-file exclude each other"),
    (["--nts", "--symmetric"], "--nts is NTPv4 client mode only"),
    (["--nts", "--ntp-version", "3"], "--nts is NTPv4 client mode only"),
    (["--nts", "--nts-port", "0"], "--nts-port must be 1-65535"),
    (["--nts", "--nts-ca", "/nonexistent/ca.pem"], "--nts-ca /nonexistent/ca.pem: no CA"),
    (["--nts-port", "4460"], "--nts-ca and --nts-port need --nts"),
    (["--nts-ca", "ca.pem"], "--nts-ca and --nts-port need --nts"),
])
def test_usage_errors(capsys, argv, message):
    assert main(["query", "127.0.0.1", "--json", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


# ----------------------------------------------------------------- a real chronyd

@pytest.fixture(scope="module")
def chronyd_nts(tmp_path_factory: pytest.TempPathFactory, certs: Certs
                ) -> Iterator[tuple[int, int]]:
    """chronyd 4.3 serving NTS on loopback: (NTP port, NTS-KE port)."""
    _, cert, key = certs
    ntp_port = free_udp_port()
    ke_port = free_tcp_port()
    config = chronyd_nts_server_config(ntp_port, ke_port, cert, key)
    with chronyd_running(tmp_path_factory.mktemp("chrony-nts"), config):
        wait_until_answering(ntp_port, timeout_s=15)
        _wait_for_tcp(ke_port)
        yield ntp_port, ke_port


def _wait_for_tcp(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@needs_chronyd
def test_chronyd_nts_ok_json(capsys, certs, chronyd_nts):
    ntp_port, ke_port = chronyd_nts
    # chronyd's NTS-KE names its NTP port itself; the one given here is only the default.
    status, report, err = query_nts(capsys, ke_port, certs[0], "--samples", "2")
    assert status == 0 and report["outcome"] == "ok", (report, err)
    assert report["authenticated"] == "nts" and report["stratum"] == 10
    assert abs(report["offset"]) < 0.001 and report["ignored"] == {}
    nts = report["nts"]
    assert isinstance(nts, dict)
    assert nts["ke_server"] == f"127.0.0.1:{ke_port}"
    assert nts["ntp_server"] == f"127.0.0.1:{ntp_port}"
    assert nts["aead"] == "AEAD_AES_SIV_CMAC_256" and nts["cookies_from_ke"] == 8
    assert nts["cookies_from_replies"] == 2


@needs_chronyd
def test_chronyd_nts_ok_text(capsys, certs, chronyd_nts):
    ntp_port, ke_port = chronyd_nts
    status = main(["query", "127.0.0.1", "--nts", "--nts-ca", str(certs[0]),
                   "--nts-port", str(ke_port)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.splitlines()[0].startswith("server 127.0.0.1: stratum 10")
    assert (f"NTS-authenticated: NTS-KE 127.0.0.1:{ke_port} (AEAD_AES_SIV_CMAC_256), "
            f"NTP server 127.0.0.1:{ntp_port}, cookies received: 8 from NTS-KE, 1 in "
            "replies") in out.splitlines()


@needs_chronyd
def test_chronyd_nts_untrusted_ca(capsys, other_ca, chronyd_nts):
    _, ke_port = chronyd_nts
    status, report, _ = query_nts(capsys, ke_port, other_ca)
    assert status == 7 and report["outcome"] == "nts_ke_failed", report
    assert "certificate not trusted" in str(report["message"])


def test_an_nts_ke_host_that_does_not_resolve(capsys, certs, monkeypatch):
    # No DNS query may leave the machine: getaddrinfo answers as a resolver would.
    def no_such_name(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    status, report, _ = query_nts(capsys, 4460, certs[0], host="nts.example.invalid")
    assert status == EXIT_STATUS["resolve_error"] == 6 and report["outcome"] == "resolve_error"
    assert report["message"] == ("nts.example.invalid: NTS-KE nts.example.invalid:4460: cannot "
                                 "resolve nts.example.invalid: Name or service not known")
