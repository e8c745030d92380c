"""An NTS-KE client (RFC 8915 §4) over pyOpenSSL (edge): what ``guardntp query --nts``
needs, and what the tests use against the server."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from . import aead
from .records import (
    AEAD_ALGORITHM,
    END_OF_MESSAGE,
    ERROR,
    ERROR_BAD_REQUEST,
    ERROR_INTERNAL,
    ERROR_UNRECOGNIZED_CRITICAL,
    EXPORTER_LABEL,
    NEW_COOKIE,
    NEXT_PROTOCOL,
    PROTOCOL_NTPV4,
    WARNING,
    MessageReader,
    Record,
    RecordError,
    encode_records,
    exporter_context,
    parse_response,
    u16_list,
)

ALPN = b"ntske/1"


class KeClientError(Exception):
    """NTS-KE with a server failed; one line why. ``kind`` says which way:
    ``timeout``, ``resolve`` (the name does not resolve), ``connect`` (refused,
    unreachable), ``untrusted`` (the certificate chain does not verify), ``name``
    (the certificate is not for the name asked), ``tls`` (any other TLS failure),
    ``alpn``, ``error_record``, ``warning_record``, ``no_cookies``, ``no_protocol``,
    ``no_aead``, ``closed``, ``bad_response``; ``failed`` when not said."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


#: RFC 8915 §4.1.3 error codes.
ERROR_NAMES = {ERROR_UNRECOGNIZED_CRITICAL: "unrecognized critical record",
               ERROR_BAD_REQUEST: "bad request", ERROR_INTERNAL: "internal server error"}
#: The X.509 verification errors a client meets most (OpenSSL's X509_V_ERR_*).
VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


@dataclass(frozen=True, slots=True)
class KeSession:
    algorithm: int
    c2s: bytes
    s2c: bytes
    cookies: tuple[bytes, ...]
    ntp_server: str | None
    ntp_port: int | None


def default_request(algorithms: tuple[int, ...] = (aead.AES_SIV_CMAC_256,)) -> bytes:
    return encode_records([
        Record(NEXT_PROTOCOL, struct.pack("!H", PROTOCOL_NTPV4), critical=True),
        Record(AEAD_ALGORITHM, struct.pack(f"!{len(algorithms)}H", *algorithms),
               critical=True),
        Record(END_OF_MESSAGE, critical=True)])


def client_context(ca_file: Path | None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_alpn_protos([ALPN])
    if ca_file is None:
        context.set_default_verify_paths()
    else:
        context.load_verify_locations(str(ca_file))
    context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return context


def connect(host: str, port: int, timeout_s: float, source: str | None = None
            ) -> socket.socket:
    """A blocking TCP connection whose reads and writes give up after ``timeout_s``
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``: pyOpenSSL needs a blocking socket, and turns the
    timeout into :class:`OpenSSL.SSL.WantReadError`)."""
    sock = socket.create_connection((host, port), timeout=timeout_s,
                                    source_address=(source, 0) if source else None)
    sock.settimeout(None)
    seconds = int(timeout_s)
    timeval = struct.pack("@ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def open_tls(host: str, port: int, server_name: str, ca_file: Path | None,
             timeout_s: float, source: str | None = None) -> SSL.Connection:
    """A TLS 1.3 connection whose certificate verifies for ``server_name``."""
    where = _where(host, port)
    context = client_context(ca_file)
    sock = connect(host, port, timeout_s, source)
    tls = SSL.Connection(context, sock)
    rejected: list[str] = []

    def check(conn: SSL.Connection, cert: object, errnum: int, depth: int, ok: int) -> bool:
        if not ok and not rejected:
            rejected.append(VERIFY_ERRORS.get(errnum, f"X.509 verify error {errnum}"))
        return bool(ok)

    tls.set_verify(SSL.VERIFY_PEER, check)
    if not _is_address(server_name):
        # RFC 6066 §3: SNI carries host names only, never an address literal.
        tls.set_tlsext_host_name(server_name.encode("idna"))
    tls.set_connect_state()
    try:
        tls.do_handshake()
    except SSL.WantReadError:
        tls.close()
        raise KeClientError(f"NTS-KE {where}: TLS handshake timed out", "timeout") from None
    except SSL.Error as error:
        tls.close()
        if rejected:
            raise KeClientError(f"NTS-KE {where}: TLS handshake failed: certificate not "
                                f"trusted ({rejected[0]})", "untrusted") from None
        raise KeClientError(f"NTS-KE {where}: TLS handshake failed ({error})",
                            "tls") from None
    if not _name_matches(tls, server_name):
        tls.close()
        raise KeClientError(f"NTS-KE {where}: certificate is not for {server_name}", "name")
    return tls


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _name_matches(tls: SSL.Connection, name: str) -> bool:
    """The (chain-verified) peer certificate names ``name`` in its subjectAltName."""
    peer = tls.get_peer_certificate()
    if peer is None:
        return False
    cert = peer.to_cryptography()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        wanted = name.lower().rstrip(".")
        for dns in san.get_values_for_type(x509.DNSName):
            pattern = dns.lower().rstrip(".")
            if pattern == wanted or (pattern.startswith("*.") and "." in wanted
                                     and wanted.split(".", 1)[1] == pattern[2:]):
                return True
        return False
    return address in san.get_values_for_type(x509.IPAddress)


def key_exchange(host: str, port: int = 4460, server_name: str | None = None,
                 ca_file: Path | None = None, timeout_s: float = 5.0,
                 request: bytes | None = None) -> KeSession:
    """Run NTS-KE against ``host:port``; :class:`KeClientError` on any failure."""
    deadline = time.monotonic() + timeout_s
    where = _where(host, port)
    try:
        tls = open_tls(host, port, server_name or host, ca_file, timeout_s)
    except socket.gaierror as error:
        raise KeClientError(f"NTS-KE {where}: cannot resolve {host}: "
                            f"{error.strerror or error}", "resolve") from None
    except UnicodeError as error:  # the IDNA codec refuses the name before any lookup
        raise KeClientError(f"NTS-KE {where}: cannot resolve {host}: invalid host name "
                            f"({error})", "resolve") from None
    except TimeoutError:
        raise KeClientError(f"NTS-KE {where}: no TCP connection within {timeout_s:g} s",
                            "timeout") from None
    except OSError as error:
        raise KeClientError(f"NTS-KE {where}: {error.strerror or error}", "connect") from None
    except SSL.Error as error:  # the CA file would not load
        raise KeClientError(f"NTS-KE {where}: cannot load the CA certificates ({error})",
                            "tls") from None
    try:
        if tls.get_alpn_proto_negotiated() != ALPN:
            raise KeClientError(f"NTS-KE {where}: server did not agree to ntske/1", "alpn")
        tls.sendall(request or default_request())
        reader = MessageReader(max_body=4096, max_message=65536, max_records=256)
        records = None
        while records is None:
            if time.monotonic() > deadline:
                raise KeClientError(f"NTS-KE {where}: no complete response within "
                                    f"{timeout_s:g} s", "timeout")
            try:
                data = tls.recv(4096)
            except SSL.ZeroReturnError:
                data = b""
            except SSL.WantReadError:
                raise KeClientError(f"NTS-KE {where}: no response within {timeout_s:g} s",
                                    "timeout") from None
            if not data:
                raise KeClientError(f"NTS-KE {where}: connection closed before the "
                                    "end of the response", "closed")
            records = reader.feed(data)
        try:
            result = parse_response(records)
        except RecordError as error:
            kind, why = explain_response(records, error.reason)
            raise KeClientError(f"NTS-KE {where}: {why}", kind) from None
        length = aead.KEY_LENGTH[result.algorithm]
        c2s = tls.export_keying_material(EXPORTER_LABEL, length,
                                         exporter_context(result.algorithm, False))
        s2c = tls.export_keying_material(EXPORTER_LABEL, length,
                                         exporter_context(result.algorithm, True))
        return KeSession(result.algorithm, c2s, s2c, result.cookies, result.server,
                         result.port)
    except RecordError as error:
        raise KeClientError(f"NTS-KE {where}: response breaks a limit ({error.reason})",
                            "bad_response") from None
    except (SSL.Error, OSError) as error:
        raise KeClientError(f"NTS-KE {where}: {error}") from None
    finally:
        tls.close()


def explain_response(records: list[Record], reason: str) -> tuple[str, str]:
    """(kind, one line) for a response :func:`~guardntp.nts.records.parse_response`
    refused with ``reason``."""
    for record in records:
        values = u16_list(record.body)
        code = values[0] if values else None
        if record.type == ERROR:
            name = ERROR_NAMES.get(code, "unknown error") if code is not None else "no code"
            return "error_record", f"server sent an Error record: {name} ({code})"
        if record.type == WARNING:
            return "warning_record", f"server sent a Warning record ({code})"
    protocols = [u16_list(r.body) for r in records if r.type == NEXT_PROTOCOL]
    if not protocols or protocols[0] != [PROTOCOL_NTPV4]:
        return "no_protocol", "server does not offer NTPv4 (Next Protocol record)"
    algorithms = [u16_list(r.body) for r in records if r.type == AEAD_ALGORITHM]
    if not algorithms or not algorithms[0] or algorithms[0][0] not in aead.KEY_LENGTH:
        return "no_aead", "no common AEAD algorithm (we offer AEAD_AES_SIV_CMAC_256)"
    if not any(r.type == NEW_COOKIE for r in records):
        return "no_cookies", "server sent no cookies"
    return "bad_response", f"malformed response ({reason})"
