"""The NTS-KE server on loopback, driven by a pyOpenSSL client: negotiation, the TLS
exporter keys in the cookies, malformed records and every abuse limit."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from guardntp.nts import aead
from guardntp.nts.client import build_request, check_reply, request_header
from guardntp.nts.cookies import CookieContents, MasterKey, MasterKeys, open_cookie
from guardntp.nts.ke_client import (
    KeClientError,
    client_context,
    connect,
    key_exchange,
    open_tls,
)
from guardntp.nts.ke_server import KeServer, KeServerError
from guardntp.nts.limits import KeLimits
from guardntp.nts.records import (
    END_OF_MESSAGE,
    ERROR,
    MessageReader,
    Record,
    encode_records,
)
from guardntp.nts.records import KeSettings as Settings
from guardntp.nts.responder import NtsReason, answer

KEYS = MasterKeys.of((MasterKey(0x1234, b"k" * 64, 0),))


def make_certs(directory: Path, name: str = "localhost",
               ca_name: str = "guardntp test CA") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server cert for ``name`` and 127.0.0.1, made now:
    (ca.pem, server chain.pem, server key.pem). Keys never leave the test's tmp dir."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = (directory / "ca.pem", directory / "server.pem",
                                    directory / "server.key")
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def running(certs: tuple[Path, Path, Path], limits: KeLimits | None = None,
            settings: Settings | None = None) -> KeServer:
    _, cert, key = certs
    server = KeServer(("127.0.0.1", 0), cert, key, lambda: KEYS,
                      settings or Settings(ntp_port=12345), limits)
    server.start()
    return server


@pytest.fixture
def server(certs: tuple[Path, Path, Path]) -> Iterator[KeServer]:
    ke = running(certs)
    yield ke
    ke.stop()


def wait_for(server: KeServer, name: str, at_least: int = 1, timeout_s: float = 5) -> int:
    deadline = time.monotonic() + timeout_s
    while server.counters.get(name, 0) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.counters.get(name, 0)


def exchange_raw(server: KeServer, ca: Path, payload: bytes, source: str = "127.0.0.1"
                 ) -> list[Record] | None:
    """Send ``payload`` after the handshake; the records of the response (None if the
    server closed without a complete one)."""
    host, port = server.address
    tls = SSL.Connection(client_context(ca), connect(host, port, 5, source))
    tls.set_connect_state()
    tls.do_handshake()
    tls.sendall(payload)
    reader = MessageReader(4096, 65536, 256)
    try:
        while True:
            data = tls.recv(4096)
            if not data:
                return None
            records = reader.feed(data)
            if records is not None:
                return records
    except (SSL.ZeroReturnError, SSL.SysCallError):
        return None
    finally:
        tls.close()


def test_key_exchange_gives_8_cookies_holding_the_exporter_keys(
        server: KeServer, certs: tuple[Path, Path, Path]) -> None:
    ca, _, _ = certs
    host, port = server.address
    session = key_exchange(host, port, server_name="localhost", ca_file=ca)
    assert session.algorithm == aead.AES_SIV_CMAC_256
    assert len(session.cookies) == 8 and len(set(session.cookies)) == 8
    assert session.ntp_port == 12345 and session.ntp_server is None
    assert len(session.c2s) == len(session.s2c) == 32 and session.c2s != session.s2c
    for cookie in session.cookies:
        assert open_cookie(KEYS, cookie) == CookieContents(15, session.c2s, session.s2c)
    # ... and an NTS-protected NTP exchange with them verifies end to end
    req = build_request(request_header(7), session.cookies[0], session.c2s, b"u" * 32,
                        b"n" * 16, placeholders=2)
    verdict = answer(req, KEYS)
    assert verdict.reason is NtsReason.ANSWERED
    header = bytes([0x24, 1]) + bytes(38) + req[40:48]
    reply = check_reply(header + verdict.extensions(header), session.s2c, b"u" * 32)
    assert len(reply.cookies) == 3
    counters = server.counters
    assert counters["ke_ok"] == 1 and counters["ke_cookies_issued"] == 8
    assert counters["ke_accepted"] == counters["ke_handshakes"] == 1


def test_aes_siv_512_when_asked_and_the_name_is_checked(
        server: KeServer, certs: tuple[Path, Path, Path]) -> None:
    ca, _, _ = certs
    from guardntp.nts.ke_client import default_request
    host, port = server.address
    session = key_exchange(host, port, "127.0.0.1", ca_file=ca,
                           request=default_request((aead.AES_SIV_CMAC_512,)))
    assert session.algorithm == 17 and len(session.c2s) == 64
    with pytest.raises(KeClientError, match="not for example.org"):
        key_exchange(host, port, "example.org", ca_file=ca)


def test_an_untrusted_client_ca_fails_the_handshake(server: KeServer, tmp_path: Path) -> None:
    other_ca, _, _ = make_certs(tmp_path / "other", ca_name="someone else")
    host, port = server.address
    with pytest.raises(KeClientError, match="handshake failed"):
        key_exchange(host, port, "localhost", ca_file=other_ca)


def test_no_alpn_is_refused(server: KeServer, certs: tuple[Path, Path, Path]) -> None:
    ca, _, _ = certs
    context = SSL.Context(SSL.TLS_METHOD)
    context.load_verify_locations(str(ca))
    tls = SSL.Connection(context, connect(*server.address, 5))
    tls.set_connect_state()
    tls.do_handshake()
    with pytest.raises((SSL.ZeroReturnError, SSL.SysCallError, SSL.Error)):
        tls.sendall(b"\x80\x01\x00\x02\x00\x00")
        assert tls.recv(100) == b""
        raise SSL.ZeroReturnError()
    tls.close()
    assert wait_for(server, "ke_alpn_missing") == 1


def test_tls_12_is_refused(server: KeServer) -> None:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_alpn_protos([b"ntske/1"])
    tls = SSL.Connection(context, connect(*server.address, 5))
    tls.set_connect_state()
    with pytest.raises(SSL.Error):
        tls.do_handshake()
    tls.close()
    assert wait_for(server, "ke_tls_failed") == 1


@pytest.mark.parametrize("payload, counter, code", [
    (struct.pack("!HH", 0x8001, 2000) + bytes(2000), "ke_record_too_long", 1),
    (encode_records([Record(0x1234, b"", critical=True), Record(1, b"\0\0", True),
                     Record(4, b"\0\x0f"), Record(END_OF_MESSAGE, critical=True)]),
     "ke_error_unrecognized_critical", 0),
    (encode_records([Record(4, b"\0\x0f"), Record(END_OF_MESSAGE, critical=True)]),
     "ke_error_bad_request", 1),
    (encode_records([Record(5, bytes(1000))] * 5), "ke_message_too_long", 1),
])
def test_malformed_requests_get_an_error_record(server: KeServer,
                                                certs: tuple[Path, Path, Path],
                                                payload: bytes, counter: str, code: int) -> None:
    records = exchange_raw(server, certs[0], payload)
    assert records is not None
    assert records[0].type == ERROR and records[0].body == struct.pack("!H", code)
    assert records[-1].type == END_OF_MESSAGE
    assert wait_for(server, counter) == 1


def test_per_source_rate(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(source_burst=3, source_rate=0.001))
    try:
        host, port = server.address
        for _ in range(3):
            key_exchange(host, port, "localhost", ca_file=certs[0])
        with pytest.raises(KeClientError):
            key_exchange(host, port, "localhost", ca_file=certs[0])
        assert wait_for(server, "ke_refused_source_rate") == 1
        # another source is unaffected
        assert exchange_raw(server, certs[0], _request(), source="127.0.0.2") is not None
    finally:
        server.stop()


def _request() -> bytes:
    from guardntp.nts.ke_client import default_request
    return default_request()


def test_per_prefix_rate(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(prefix_burst=2, prefix_rate=0.001))
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            assert exchange_raw(server, certs[0], _request(), source=source) is not None
        with pytest.raises((SSL.Error, OSError)):
            exchange_raw(server, certs[0], _request(), source="127.0.0.4")
        assert wait_for(server, "ke_refused_prefix_rate") == 1
    finally:
        server.stop()


def test_global_handshake_budget(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(handshake_burst=2, handshake_rate=0.001))
    try:
        for source in ("127.0.0.2", "127.1.0.2"):
            assert exchange_raw(server, certs[0], _request(), source=source) is not None
        with pytest.raises((SSL.Error, OSError)):
            exchange_raw(server, certs[0], _request(), source="127.2.0.2")
        assert wait_for(server, "ke_refused_handshake_budget") == 1
    finally:
        server.stop()


def test_concurrency_cap_and_idle_timeout(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(max_connections=2, idle_timeout_s=0.4,
                                     session_timeout_s=5))
    silent = []
    try:
        for _ in range(2):
            silent.append(socket.create_connection(server.address, timeout=5))
        assert wait_for(server, "ke_accepted", 2) == 2
        third = socket.create_connection(server.address, timeout=5)
        assert third.recv(10) == b""  # closed at once
        third.close()
        assert wait_for(server, "ke_refused_concurrency") == 1
        # the silent ones are closed after the idle timeout, and room is made again
        assert wait_for(server, "ke_timeout", 2) == 2
        for sock in silent:
            assert sock.recv(10) == b""
        assert exchange_raw(server, certs[0], _request()) is not None
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def test_slowloris_hits_the_session_timeout(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(session_timeout_s=0.6, idle_timeout_s=0.3))
    try:
        tls = open_tls(*server.address, "localhost", certs[0], 5)
        started = time.monotonic()
        closed = False
        request = _request()
        for i in range(len(request) - 1):  # a byte every 0.1 s: never idle, never done
            try:
                tls.send(request[i:i + 1])
            except SSL.Error:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break
        if not closed:
            with pytest.raises(SSL.Error):
                tls.recv(100)
                tls.recv(100)
        tls.close()
        assert wait_for(server, "ke_timeout") == 1
        assert time.monotonic() - started < 3
    finally:
        server.stop()


def test_bounded_connection_flood(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs, KeLimits(source_burst=8, source_rate=0.01, max_connections=32,
                                     idle_timeout_s=0.5))
    flood = []
    try:
        for _ in range(150):
            with contextlib.suppress(OSError):
                flood.append(socket.create_connection(server.address, timeout=2))
        time.sleep(0.3)
        counters = server.counters
        assert counters.get("ke_accepted", 0) <= 8
        assert counters.get("ke_refused_source_rate", 0) >= 100
        # a client from another source still gets its cookies meanwhile
        records = exchange_raw(server, certs[0], _request(), source="127.9.0.1")
        assert records is not None and sum(r.type == 5 for r in records) == 8
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def test_garbage_instead_of_tls_is_counted(server: KeServer) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)))
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    assert wait_for(server, "ke_tls_failed") == 1


def test_no_key_file_yet_is_an_internal_error_record(certs: tuple[Path, Path, Path]) -> None:
    def no_keys() -> MasterKeys:
        raise RuntimeError("nts-keys: not loaded yet")
    ke = KeServer(("127.0.0.1", 0), certs[1], certs[2], no_keys)
    ke.start()
    try:
        records = exchange_raw(ke, certs[0], _request())
        assert records is not None and records[0].type == ERROR
        assert records[0].body == b"\x00\x02"
        assert ke.counters["ke_error_internal"] == 1
    finally:
        ke.stop()


def test_reconfigure_limits_live(certs: tuple[Path, Path, Path]) -> None:
    server = running(certs)
    try:
        assert exchange_raw(server, certs[0], _request()) is not None
        server.reconfigure(limits=KeLimits(source_burst=1, source_rate=0.001))
        # the source's bucket is kept (7 of 8 left), now capped at the new burst of 1
        assert exchange_raw(server, certs[0], _request()) is not None
        with pytest.raises((SSL.Error, OSError)):
            exchange_raw(server, certs[0], _request())
        server.reconfigure(settings=Settings(ntp_port=4242))
        records = exchange_raw(server, certs[0], _request(), source="127.0.0.7")
        assert records is not None
        assert [r.body for r in records if r.type == 7] == [struct.pack("!H", 4242)]
    finally:
        server.stop()


def test_reload_cert(certs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    server = running(certs)
    try:
        # OpenSSL gives no reason for a missing file: it was "cannot load it ()".
        with pytest.raises(KeServerError, match=r"missing\.pem: cannot load it "
                           r"\(No such file or directory\)$"):
            server.reload_cert(tmp_path / "missing.pem", tmp_path / "missing.key")
        with pytest.raises(KeServerError, match=r"^NTS key .*missing\.key: cannot load it "
                           r"\(No such file or directory\)$"):
            server.reload_cert(certs[1], tmp_path / "missing.key")
        host, port = server.address
        key_exchange(host, port, "localhost", ca_file=certs[0])  # old pair still serves
        new_ca, new_cert, new_key = make_certs(tmp_path / "new", ca_name="rotated CA")
        with pytest.raises(KeServerError, match="does not match"):
            server.reload_cert(new_cert, certs[2])
        server.reload_cert(new_cert, new_key)
        with pytest.raises(KeClientError):
            key_exchange(host, port, "localhost", ca_file=certs[0])
        key_exchange(host, port, "localhost", ca_file=new_ca)
        assert server.counters["ke_cert_reloaded"] == 1
    finally:
        server.stop()


def test_every_counter_is_declared() -> None:
    import re

    import guardntp.nts.ke_server as ke_server
    import guardntp.nts.limits as limits
    from guardntp.nts.ke_server import KE_COUNTERS
    assert len(set(KE_COUNTERS)) == len(KE_COUNTERS)
    literals = set()
    for module in (ke_server, limits):
        source = Path(module.__file__ or "").read_text()
        literals |= set(re.findall(r'"(ke_[a-z_]+)"', source))
    record_errors = {f"ke_{reason}" for reason in ("record_too_long", "message_too_long",
                                                   "too_many_records", "data_after_end")}
    assert literals | record_errors <= set(KE_COUNTERS)


def test_start_on_a_busy_port_is_one_line(server: KeServer,
                                          certs: tuple[Path, Path, Path]) -> None:
    other = KeServer(server.address, certs[1], certs[2], lambda: KEYS)
    with pytest.raises(KeServerError, match=r"NTS-KE listen 127\.0\.0\.1:\d+: "):
        other.start()
    other.stop()
