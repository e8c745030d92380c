"""The NTS-KE server (RFC 8915 §4): TLS 1.3, ALPN ``ntske/1``, default port 4460 (edge).

One thread runs a selector over non-blocking pyOpenSSL connections (Python's
``ssl`` has no TLS exporter; pyOpenSSL has ``export_keying_material``). Each
connection: admission (:mod:`guardntp.nts.limits`), handshake, one request read
through :class:`~guardntp.nts.records.MessageReader` (record and message size
limits), :func:`~guardntp.nts.records.respond`, close. A connection that does not
finish within ``session_timeout_s``, or is silent for ``idle_timeout_s``, is closed.
Every connection ends in exactly one counted reason (:attr:`KeServer.counters`).

Use::

    server = KeServer(("0.0.0.0", 4460), cert, key, lambda: store.keys,
                      KeSettings(ntp_port=123))
    server.start()            # binds, then serves in a daemon thread
    server.reload_cert(cert, key)   # SIGHUP: new connections use the new pair
    server.stop()
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from .cookies import CookieContents, MasterKeys, make_cookie
from .limits import Admission, KeLimits
from .records import (
    ERROR_BAD_REQUEST,
    ERROR_INTERNAL,
    EXPORTER_LABEL,
    KeOutcome,
    KeSettings,
    MessageReader,
    RecordError,
    error_response,
    respond,
)

ALPN = b"ntske/1"
DEFAULT_PORT = 4460
#: Connections accepted per wake-up of the loop (a bounded loop under a SYN flood).
ACCEPT_BATCH = 64

#: Every counter :attr:`KeServer.counters` may hold (a bounded label set for metrics).
#: Admission: ``ke_accepted`` or one ``ke_refused_*``. Progress: ``ke_handshakes``
#: (TLS completed), ``ke_cookies_issued``, ``ke_cert_reloaded``. How an accepted
#: connection ended: one of the rest.
KE_COUNTERS: tuple[str, ...] = (
    "ke_accepted", "ke_refused_concurrency", "ke_refused_source_rate",
    "ke_refused_prefix_rate", "ke_refused_handshake_budget", "ke_refused_no_descriptors",
    "ke_handshakes", "ke_cookies_issued", "ke_cert_reloaded",
    *(outcome.value for outcome in KeOutcome),
    "ke_tls_failed", "ke_alpn_missing", "ke_timeout", "ke_closed_early",
    "ke_connection_error", "ke_record_too_long", "ke_message_too_long",
    "ke_too_many_records", "ke_data_after_end",
)


class KeServerError(Exception):
    """The KE server cannot start or load its certificate; one line naming why."""


def make_context(cert_file: Path, key_file: Path) -> SSL.Context:
    """A TLS 1.3-only server context offering only ``ntske/1``; :class:`KeServerError`."""
    for what, path in (("certificate", cert_file), ("key", key_file)):
        try:   # OpenSSL's own error for a missing file has no reason text at all
            with open(path, "rb"):
                pass
        except OSError as error:
            raise KeServerError(f"NTS {what} {path}: cannot load it "
                                f"({error.strerror or error})") from None
        except ValueError as error:   # a NUL in the name
            raise KeServerError(f"NTS {what} {str(path)!r}: cannot load it ({error})") \
                from None
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    try:
        context.use_certificate_chain_file(str(cert_file))
    except (SSL.Error, OSError) as error:
        raise KeServerError(f"NTS certificate {cert_file}: cannot load it "
                            f"({_ssl_reason(error)})") from None
    try:
        context.use_privatekey_file(str(key_file))
        context.check_privatekey()
    except (SSL.Error, OSError) as error:
        raise KeServerError(f"NTS key {key_file}: cannot load it or it does not match "
                            f"{cert_file} ({_ssl_reason(error)})") from None

    def select(conn: SSL.Connection, offered: list[bytes]) -> Any:
        return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    context.set_alpn_select_callback(select)
    return context


def _ssl_reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    args = error.args[0] if error.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return str(args[0][-1])
    return str(error) or type(error).__name__


class _Conn:
    __slots__ = ("sock", "tls", "peer", "state", "reader", "out", "sent", "deadline",
                 "idle_deadline", "events")

    def __init__(self, sock: socket.socket, tls: SSL.Connection, peer: str, now: float,
                 limits: KeLimits) -> None:
        self.sock = sock
        self.tls = tls
        self.peer = peer
        self.state = "handshake"
        self.reader = MessageReader(limits.max_record_body, limits.max_request)
        self.out = b""
        self.sent = 0
        self.deadline = now + limits.session_timeout_s
        self.idle_deadline = now + limits.idle_timeout_s
        self.events = selectors.EVENT_READ


class KeServer:
    def __init__(self, listen: tuple[str, int], cert_file: Path, key_file: Path,
                 keys: Callable[[], MasterKeys], settings: KeSettings | None = None,
                 limits: KeLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.listen = listen
        self.keys = keys
        self.settings = settings or KeSettings()
        self.limits = limits or KeLimits()
        self.clock = clock
        self.random_bytes = random_bytes
        self._context = make_context(cert_file, key_file)
        self._admission = Admission(self.limits, clock())
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()

    # --- control (any thread) ---------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise KeServerError("NTS-KE server not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def counters(self) -> dict[str, int]:
        """Counts by name (only those that happened; :data:`KE_COUNTERS` lists all)."""
        with self._lock:
            return dict(self._counts)

    def reload_cert(self, cert_file: Path, key_file: Path) -> None:
        """Load a new certificate and key for new connections; on failure raise
        :class:`KeServerError` and keep serving with the old pair."""
        self.use_context(make_context(cert_file, key_file))

    def use_context(self, context: SSL.Context) -> None:
        """New connections use ``context`` (from :func:`make_context`): a reload that
        loads the certificate first and swaps it in only once all else is ready."""
        self._context = context
        self._count("ke_cert_reloaded")

    def reconfigure(self, settings: KeSettings | None = None,
                    limits: KeLimits | None = None) -> None:
        """New settings or limits (``guardntp reload``) for what comes next; the rate
        buckets are kept, open connections keep their deadlines."""
        if settings is not None:
            self.settings = settings
        if limits is not None:
            self._admission.reconfigure(limits)
            self.limits = limits

    def start(self) -> None:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as error:
            sock.close()
            raise KeServerError(f"NTS-KE listen {host}:{port}: {error.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        self._sel.register(sock, selectors.EVENT_READ, "listen")
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="nts-ke", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout_s)
        for conn in list(self._conns.values()):
            self._close(conn, None)
        self._sel.close()
        if self._sock is not None:
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the loop (its own thread) ----------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = self.clock()
            soonest = min((min(c.deadline, c.idle_deadline) for c in self._conns.values()),
                          default=now + 1.0)
            for key, _ in self._sel.select(max(0.0, min(1.0, soonest - now))):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    conn = self._conns.get(key.fd)
                    if conn is not None:
                        try:
                            self._step(conn)
                        except Exception:  # a bug must not stop the service: counted
                            self._close(conn, "ke_error_internal")
            now = self.clock()
            for conn in list(self._conns.values()):
                if now >= conn.deadline or now >= conn.idle_deadline:
                    self._close(conn, "ke_timeout")

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._count("ke_refused_no_descriptors")
                    return
                continue
            now = self.clock()
            peer = str(address[0])
            verdict = self._admission.admit(peer, len(self._conns), now)
            self._count(verdict)
            if verdict != "ke_accepted":
                sock.close()
                continue
            sock.setblocking(False)
            tls = SSL.Connection(self._context, sock)
            tls.set_accept_state()
            conn = _Conn(sock, tls, peer, now, self.limits)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, "conn")

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self._sel.modify(conn.sock, events, "conn")

    def _step(self, conn: _Conn) -> None:
        conn.idle_deadline = self.clock() + self.limits.idle_timeout_s
        try:
            if conn.state == "handshake":
                conn.tls.do_handshake()
                self._count("ke_handshakes")
                if conn.tls.get_alpn_proto_negotiated() != ALPN:
                    self._close(conn, "ke_alpn_missing")
                    return
                conn.state = "read"
            if conn.state == "read":
                self._read(conn)
            if conn.state == "write":
                while conn.sent < len(conn.out):
                    conn.sent += conn.tls.send(conn.out[conn.sent:conn.sent + 16384])
                self._finish(conn)
        except SSL.WantReadError:
            self._want(conn, selectors.EVENT_READ)
        except SSL.WantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
        except SSL.ZeroReturnError:
            self._close(conn, "ke_closed_early")
        except (SSL.SysCallError, OSError):
            self._close(conn, "ke_connection_error" if conn.state != "handshake"
                        else "ke_tls_failed")
        except SSL.Error:
            self._close(conn, "ke_tls_failed" if conn.state == "handshake"
                        else "ke_connection_error")

    def _read(self, conn: _Conn) -> None:
        while True:
            data = conn.tls.recv(4096)  # WantReadError ends the loop
            if not data:
                self._close(conn, "ke_closed_early")
                return
            try:
                records = conn.reader.feed(data)
            except RecordError as error:
                self._count(f"ke_{error.reason}")
                conn.out = error_response(ERROR_BAD_REQUEST)
                conn.state = "write"
                return
            if records is not None:
                break
        tls = conn.tls

        def export(context: bytes, length: int) -> bytes:
            return tls.export_keying_material(EXPORTER_LABEL, length, context)

        try:
            keys = self.keys()
        except Exception:  # no key file yet, or a broken one: say so in one record
            self._count("ke_error_internal")
            conn.out = error_response(ERROR_INTERNAL)
            conn.state = "write"
            return
        issued = 0

        def cookie(algorithm: int, c2s: bytes, s2c: bytes) -> bytes:
            nonlocal issued
            issued += 1
            return make_cookie(keys, CookieContents(algorithm, c2s, s2c), self.random_bytes(16))

        conn.out, outcome = respond(records, self.settings, export, cookie)
        self._count(outcome.value)
        if outcome is KeOutcome.OK:
            self._count("ke_cookies_issued", issued)
        conn.state = "write"

    def _finish(self, conn: _Conn) -> None:
        with contextlib.suppress(SSL.Error):
            conn.tls.shutdown()
        self._close(conn, None)

    def _close(self, conn: _Conn, reason: str | None) -> None:
        if reason is not None:
            self._count(reason)
        if self._conns.pop(conn.sock.fileno(), None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.sock.close()
