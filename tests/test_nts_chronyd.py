"""Interop: a real chronyd 4.3 as an NTS client of guardntp's NTS-KE server and of a
tiny UDP responder built from the pure ``guardntp.nts.responder.answer`` (a test
fixture, not the product server), all on loopback ports.

chronyd never falls back to plain NTP on an ``nts`` source, so "System clock wrong by"
from ``chronyd -Q`` means it completed NTS-KE, used our cookies and accepted
NTS-authenticated replies; the negative cases (a reply authenticator flipped, a cookie
key the responder does not know) show it does not print that otherwise.
"""

from __future__ import annotations

import socket
import struct
import subprocess
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
    parse_chronyd_offset,
)
from test_nts_ke import make_certs

from guardntp.nts.cookies import MasterKey, MasterKeys
from guardntp.nts.extensions import has_unique_identifier
from guardntp.nts.ke_server import KeServer
from guardntp.nts.records import KeSettings
from guardntp.nts.responder import NtsCounters, NtsOutcome, NtsVerdict, answer
from guardntp.timestamps import unix_ns_to_ntp

pytestmark = [needs_chronyd, pytest.mark.peers, pytest.mark.slow]

OLD = MasterKey(1, b"o" * 64, 1000)
NEW = MasterKey(2, b"n" * 64, 2000)
OTHER = MasterKey(3, b"x" * 64, 3000)


class NtsUdpResponder:
    """Answers NTS requests on a loopback UDP port with ``answer()``; bounded loop."""

    def __init__(self, keys: MasterKeys, tamper: bool = False) -> None:
        self.keys = keys
        self.tamper = tamper
        self.counters = NtsCounters()
        self.plain = 0
        self.sizes: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NtsUdpResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
        assert not self.errors, self.errors

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            receive_ns = time.time_ns()
            if not has_unique_identifier(data):
                self.plain += 1  # chronyd must never send these to an nts source
                continue
            verdict = answer(data, self.keys)
            self.counters.add(verdict)
            if verdict.outcome is NtsOutcome.DROP:
                continue
            try:
                reply = self._reply(data, verdict, receive_ns)
            except Exception as error:  # a fixture bug must fail the test, not hide
                self.errors.append(error)
                continue
            self.sizes.append((len(data), len(reply)))
            self.sock.sendto(reply, address)

    def _reply(self, request: bytes, verdict: NtsVerdict, receive_ns: int) -> bytes:
        origin = int.from_bytes(request[40:48], "big")
        if verdict.outcome is NtsOutcome.NAK:
            header = struct.pack("!BBBbII4sQQQQ", 0xE4, 0, request[2], -20, 0, 0, b"NTSN",
                                 0, origin, origin, origin)
            return header + verdict.extensions(header)
        header = struct.pack("!BBBbII4sQQQQ", 0x24, 1, request[2], -20, 0, 16, b"GPS\0",
                             unix_ns_to_ntp(receive_ns - 10**9), origin,
                             unix_ns_to_ntp(receive_ns), unix_ns_to_ntp(time.time_ns()))
        extensions = bytearray(verdict.extensions(header))
        if self.tamper:
            extensions[-20] ^= 1
        return header + bytes(extensions)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("nts-certs"))


@pytest.fixture
def ke_keys() -> Iterator[list[MasterKeys]]:
    yield [MasterKeys.of((OLD,))]


def run_chronyd(directory: Path, ca: Path, ntp_port: int, ke_port: int,
                timeout_s: int) -> str:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "chrony.conf"
    conf.write_text(f"server 127.0.0.1 port {ntp_port} nts ntsport {ke_port} iburst "
                    f"maxsamples 4\nntstrustedcerts {ca}\n"
                    f"pidfile {directory}/chronyd.pid\ncmdport 0\n")
    result = subprocess.run(["chronyd", "-Q", "-d", "-t", str(timeout_s), "-u", "root",
                             "-f", str(conf)], capture_output=True, text=True,
                            timeout=timeout_s + 20, check=False)
    return result.stdout + result.stderr


def chronyd_against_fixture(directory: Path, certs: tuple[Path, Path, Path],
                            responder: NtsUdpResponder, timeout_s: int
                            ) -> tuple[str, dict[str, int]]:
    """chronyd -Q against our KE server (cookies under OLD) and ``responder``:
    (chronyd's log, the KE server's counters)."""
    ca, cert, key = certs
    with responder as udp:
        ke = KeServer(("127.0.0.1", 0), cert, key, lambda: MasterKeys.of((OLD,)),
                      KeSettings(ntp_port=udp.port))
        ke.start()
        try:
            log = run_chronyd(directory, ca, udp.port, ke.address[1], timeout_s)
        finally:
            ke.stop()
    return log, ke.counters


@pytest.mark.parametrize("scenario", ["same_keys", "rotated_since_ke"])
def test_chronyd_accepts_nts_time_within_1ms(tmp_path: Path, certs: tuple[Path, Path, Path],
                                             scenario: str) -> None:
    # rotated_since_ke: the cookies come from before a rotation the responder has seen.
    responder_keys = (MasterKeys.of((OLD,)) if scenario == "same_keys"
                      else MasterKeys.of((OLD, NEW)))
    udp = NtsUdpResponder(responder_keys)
    log, counters = chronyd_against_fixture(tmp_path / "chrony", certs, udp, 15)
    offset = parse_chronyd_offset(log)
    assert offset is not None, log
    assert abs(offset) < 0.001, log
    assert counters["ke_ok"] >= 1 and counters["ke_cookies_issued"] >= 8, counters
    answered = udp.counters.snapshot()
    assert answered["nts_answered"] >= 1, answered
    assert udp.plain == 0
    assert all(reply <= request for request, reply in udp.sizes)
    if scenario == "rotated_since_ke":
        assert udp.counters.snapshot()["nts_cookies_issued"] >= 1


def test_chronyd_reports_the_source_as_nts_authenticated(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    """A running chronyd (``-x -d``) polling every 0.25 s: ``chronyc ntpdata`` says
    "Authenticated : Yes" and ``authdata`` shows mode NTS with cookies."""
    ca, cert, key = certs
    directory = tmp_path / "chrony"
    socket_path = directory / "chronyd.sock"
    with NtsUdpResponder(MasterKeys.of((OLD,))) as udp:
        ke = KeServer(("127.0.0.1", 0), cert, key, lambda: MasterKeys.of((OLD,)),
                      KeSettings(ntp_port=udp.port))
        ke.start()
        try:
            config = (f"server 127.0.0.1 port {udp.port} nts ntsport {ke.address[1]} "
                      f"iburst minpoll -2 maxpoll -2\nntstrustedcerts {ca}\n"
                      f"bindcmdaddress {socket_path}\ncmdport 0\n")
            with chronyd_running(directory, config):
                deadline = time.monotonic() + 20
                ntpdata = authdata = ""
                while time.monotonic() < deadline:
                    time.sleep(0.5)
                    ntpdata = _chronyc(socket_path, "ntpdata")
                    good = [line for line in ntpdata.splitlines()
                            if line.startswith("Total good RX")]
                    if good and int(good[0].split(":")[1]) >= 3:
                        authdata = _chronyc(socket_path, "authdata")
                        break
        finally:
            ke.stop()
    assert "Authenticated   : Yes" in ntpdata, ntpdata
    row = [line.split() for line in authdata.splitlines() if line.startswith("127.0.0.1")]
    assert row, authdata
    name, mode, key_id, aead_id, key_bits, *_, cookies, cookie_len = row[0]
    assert (mode, aead_id, key_bits, cookie_len) == ("NTS", "15", "256", "104"), authdata
    assert int(cookies) >= 1
    assert udp.plain == 0 and udp.counters.snapshot()["nts_answered"] >= 3
    assert all(reply <= request for request, reply in udp.sizes)


def _chronyc(socket_path: Path, command: str) -> str:
    result = subprocess.run(["chronyc", "-h", str(socket_path), "-n", command],
                            capture_output=True, text=True, timeout=10, check=False)
    return result.stdout + result.stderr


def test_chronyd_rejects_a_tampered_reply(tmp_path: Path,
                                          certs: tuple[Path, Path, Path]) -> None:
    udp = NtsUdpResponder(MasterKeys.of((OLD,)), tamper=True)
    log, _ = chronyd_against_fixture(tmp_path / "chrony", certs, udp, 8)
    assert udp.counters.snapshot()["nts_answered"] >= 1
    assert parse_chronyd_offset(log) is None, log
    assert udp.plain == 0


def test_chronyd_gets_a_nak_for_a_cookie_of_an_unknown_key(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    udp = NtsUdpResponder(MasterKeys.of((OTHER,)))
    log, _ = chronyd_against_fixture(tmp_path / "chrony", certs, udp, 8)
    assert udp.counters.snapshot()["nts_nak_cookie_unknown_key"] >= 1
    assert parse_chronyd_offset(log) is None, log
    assert udp.plain == 0


def test_our_client_side_against_chronyds_own_nts_server(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    """The other direction: guardntp's KE client and NTS request/reply code (what
    ``guardntp query --nts`` builds on) against chronyd serving NTS."""
    from guardntp.nts.client import build_request, check_reply, request_header
    from guardntp.nts.ke_client import key_exchange

    ca, cert, key = certs
    ntp_port = free_udp_port()
    ke_port = free_tcp_port()
    config = chronyd_nts_server_config(ntp_port, ke_port, cert, key)
    with chronyd_running(tmp_path / "chrony", config):
        deadline = time.monotonic() + 10
        while True:
            try:
                session = key_exchange("127.0.0.1", ke_port, "localhost", ca, timeout_s=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert len(session.cookies) == 8 and session.algorithm == 15
        cookies = list(session.cookies)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            for round_ in range(3):
                transmit = unix_ns_to_ntp(time.time_ns()) ^ round_
                unique_id = bytes([round_]) * 32
                request = build_request(request_header(transmit), cookies.pop(0),
                                        session.c2s, unique_id, bytes([7 + round_]) * 16,
                                        placeholders=1)
                sock.sendto(request, ("127.0.0.1", session.ntp_port or ntp_port))
                reply, _ = sock.recvfrom(4096)
                assert len(reply) <= len(request)
                assert reply[24:32] == transmit.to_bytes(8, "big")  # origin
                checked = check_reply(reply, session.s2c, unique_id)
                assert len(checked.cookies) == 2  # one per cookie and placeholder sent
                cookies += checked.cookies
