"""The UDP edge: sockets, kernel receive timestamps, a small event loop.

Rule: this is where clocks, sockets and signals live. Each datagram goes to
``Pipeline.decide`` with its kernel receive time (SO_TIMESTAMPNS), the monotonic
time of its batch and the TTL / hop limit it arrived with (IP_RECVTTL,
IPV6_RECVHOPLIMIT); a time reply gets its transmit timestamp written immediately
before ``sendto`` (the compiled loop, ``fastlane``: before each ``sendmmsg`` of up
to 16 replies). The compiled loop serves every socket where it was built; the
one-``recvmsg``-per-packet loop here is the fallback. Other features plug in with
:meth:`Server.add_reader` (control socket) and :meth:`Server.add_periodic`
(blocklist refresh, clock).
"""

from __future__ import annotations

import errno
import gc
import logging
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import fastlane
from .filter.pipeline import Pipeline
from .netaddr import ListenSpec, packed_from_sockaddr
from .timesources import TimeSource
from .verdicts import Reason

log = logging.getLogger("guardntp.server")

# <asm-generic/socket.h>: not exported by Python's socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
_INT = struct.Struct("@i")
# <linux/in.h>: IP_RECVTTL is not exported by Python's socket module (3.11).
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IP_TTL = getattr(socket, "IP_TTL", 2)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
#: Larger than any NTP packet we accept (48 + extension fields + MAC); longer is cut.
RECV_BUFFER = fastlane.RECV_BUFFER
#: Room for the receive timestamp and one TTL or hop-limit message (an int).
_ANC_BUFFER = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_INT.size)
#: Datagrams handled per socket per wake-up before the loop looks at timers again.
BATCH = 256
#: A decision that raises is logged at most this often (each is counted).
DECISION_ERROR_LOG_S = 60.0
#: The clock snapshot is re-taken this often (root dispersion grows 15 ppm/s:
#: a quarter second is 4 us of dispersion, far below what a reply carries).
CLOCK_REFRESH_S = 0.25
#: Objects alive this long are moved out of the cyclic GC's sight (``gc.freeze``). The
#: filter keeps up to a million per-source lists; a full collection walks them all,
#: ~170 ms with a million, and the socket overflows meanwhile. Frozen, a collection
#: walks only what was made since (~7 ms). The cost: a reference cycle that was alive
#: at a freeze is never collected once it becomes garbage; refcounting still frees
#: everything else, and the records form no cycles (docs/benchmarks.md).
GC_FREEZE_S = 1.0
#: ... so once an hour everything is unfrozen and fully collected: a cycle that became
#: garbage while frozen lives at most an hour, for one ~170 ms pause an hour at a
#: million tracked sources (a server that runs for months must not leak).
GC_FULL_COLLECT_S = 3600.0
_TIME_REASONS = (Reason.ANSWERED, Reason.LEAKED)


def collect_frozen_garbage() -> None:
    """Unfreeze, collect everything, freeze again (see GC_FULL_COLLECT_S)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ListenError(Exception):
    """A listen address cannot be used; the message is one line for the operator."""


def open_socket(spec: ListenSpec, reuse_port: bool = False) -> socket.socket:
    """Bind a UDP socket with kernel receive timestamps, or raise :class:`ListenError`.

    ``reuse_port``: one of several sockets on the same address (``--workers``).
    """
    sock = socket.socket(spec.family, socket.SOCK_DGRAM)
    try:
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        enable_arrival_ttl(sock)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((spec.host, spec.port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {spec}: address already in use "
                              "(is another NTP server running?)") from None
        if error.errno == errno.EACCES:
            raise ListenError(f"cannot listen on {spec}: permission denied (ports below 1024 "
                              "need root or CAP_NET_BIND_SERVICE; try a port above 1023)"
                              ) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"cannot listen on {spec}: no such local address") from None
        raise ListenError(f"cannot listen on {spec}: {error.strerror}") from None
    sock.setblocking(False)
    return sock


# <linux/in.h>; Python exports them only on some builds.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


def set_dont_fragment(sock: socket.socket) -> None:
    """Send IPv4 replies with DF set (IPv6 never fragments in transit anyway).

    A reply is never longer than the request that just crossed the same path, so it
    never needs fragmenting; and with DF the kernel leaves the IP ID at zero instead
    of running its per-destination ID generator for every reply (RFC 6864 allows
    this): ``__ip_select_ident`` was 9 % of the server's CPU at saturation
    (docs/benchmarks.md). Best effort: a platform without the option keeps its default.
    """
    if sock.family != socket.AF_INET:
        return
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except OSError as error:
        log.debug("IP_MTU_DISCOVER: %s", error)


def enable_arrival_ttl(sock: socket.socket) -> None:
    """Have the kernel report each datagram's IP TTL / IPv6 hop limit (a control message).

    IPv4 sockets: IP_RECVTTL. IPv6 sockets: IPV6_RECVHOPLIMIT, and IP_RECVTTL as
    well, since a dual-stack socket gets IP_TTL messages for IPv4-mapped traffic
    only with it (a v6-only socket may refuse it: ignored). Both packet loops read
    these messages; sockets from :func:`open_socket` and systemd's
    (``systemd.inherited_sockets``) have them. Best effort: where the kernel
    refuses, the filter is told -1 (unknown) and the server runs on.
    """
    options = [(socket.IPPROTO_IP, IP_RECVTTL, "IP_RECVTTL")]
    if sock.family == socket.AF_INET6:
        options.insert(0, (socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, "IPV6_RECVHOPLIMIT"))
    elif sock.family != socket.AF_INET:
        return
    for level, option, name in options:
        try:
            sock.setsockopt(level, option, 1)
        except OSError as error:
            log.debug("%s: %s (arrival TTL unknown for such datagrams)", name, error)


def parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[int | None, int]:
    """(kernel receive time in ns or None, arrival TTL / hop limit or -1) from recvmsg's
    ancillary data."""
    recv_ns: int | None = None
    ttl = -1
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET:
            if kind == SCM_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                recv_ns = int(seconds) * 1_000_000_000 + int(nanoseconds)
        elif len(data) >= _INT.size and (
                (level == socket.IPPROTO_IP and kind == IP_TTL)
                or (level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT)):
            ttl = _INT.unpack_from(data)[0]
    return recv_ns, ttl


def kernel_receive_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    return parse_ancillary(ancdata)[0]


@dataclass
class _Periodic:
    interval_s: float
    callback: Callable[[], None]
    due: float = field(default=0.0)


class Server:
    def __init__(self, sockets: list[socket.socket], pipeline: Pipeline, source: TimeSource,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.sockets = sockets
        self.pipeline = pipeline
        self.source = source
        self.wall_ns = wall_ns
        self.selector = selectors.DefaultSelector()
        self.periodic: list[_Periodic] = []
        self._stopping = False
        #: While run() serves (without ``until``): when its next timer is due,
        #: monotonic ns. Until then the compiled loop may wait for datagrams itself.
        self._wait_until_ns = 0
        self._watch: dict[socket.socket, tuple[int, ...]] = {}
        self.send_errors = 0
        self.truncated = 0
        #: Batches (compiled loop) or datagrams (Python loop) whose decision raised:
        #: a bug, counted and logged, never the end of the server.
        self.decision_errors = 0
        self._decision_error_logged_s = -DECISION_ERROR_LOG_S
        #: Per socket, the compiled loop (``fastlane``) where it is built; a socket
        #: not in here is served by the one-recvmsg-per-packet loop below.
        self.batched: dict[socket.socket, fastlane.FastLane] = {}
        for sock in sockets:
            set_dont_fragment(sock)
            self.selector.register(sock, selectors.EVENT_READ, self._on_datagrams)
            if fastlane.available(sock):
                self.batched[sock] = fastlane.FastLane(sock, pipeline)
        if sockets and fastlane.available():
            log.info("packet loop: compiled (guardntp._fastlane)")
        elif sockets:
            # Several times slower under a flood: an operator must see this at start.
            log.warning("packet loop: the plain Python recvmsg loop is serving, NOT the "
                        "compiled one (%s): the reference model (Pipeline.decide) decides "
                        "every packet; expect a fraction of the compiled loop's rate under "
                        "a flood", fastlane.unavailable_because())
        self.add_periodic(CLOCK_REFRESH_S, self.refresh_clock)
        self.add_periodic(GC_FREEZE_S, gc.freeze)
        self.add_periodic(GC_FULL_COLLECT_S, collect_frozen_garbage)

    # ------------------------------------------------------------------ plumbing

    def add_reader(self, fileobj: socket.socket, callback: Callable[[socket.socket], None]
                   ) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)
        self._watch.clear()

    def remove_reader(self, fileobj: socket.socket) -> None:
        self.selector.unregister(fileobj)
        self._watch.clear()

    def _others(self, sock: socket.socket) -> tuple[int, ...]:
        """The descriptors the loop watches besides ``sock`` (the compiled loop's
        wait returns to Python when one of them is readable)."""
        watch = self._watch.get(sock)
        if watch is None:
            own = sock.fileno()
            watch = tuple(key.fd for key in self.selector.get_map().values() if key.fd != own)
            self._watch[sock] = watch
        return watch

    def add_periodic(self, interval_s: float, callback: Callable[[], None]) -> None:
        self.periodic.append(_Periodic(interval_s, callback))

    def refresh_clock(self) -> None:
        now = self.wall_ns()
        self.pipeline.responder.set_clock(self.source.state(now), now)

    def stop(self) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: object) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

    # ------------------------------------------------------------------ the loop

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Serve until :meth:`stop` (or a signal), or until ``until()`` is true."""
        self.source.start()
        try:
            while not self._stopping and not (until and until()):
                now = time.monotonic()
                timeout = 0.5
                for task in self.periodic:
                    if now >= task.due:
                        task.due = now + task.interval_s
                        try:
                            task.callback()
                        except Exception:  # a timer must never take the server down
                            log.exception("periodic task %r failed", task.callback)
                    timeout = min(timeout, max(0.0, task.due - now))
                if until is None:   # ``until`` must be asked after every event
                    self._wait_until_ns = time.monotonic_ns() + int(timeout * 1e9)
                for key, _ in self.selector.select(timeout):
                    key.data(key.fileobj)
        finally:
            self._wait_until_ns = 0
            self.source.stop()

    def _transmit_bytes(self) -> bytes:
        """The transmit timestamp field to serve right now (read just before a send)."""
        return self.pipeline.responder.served_ntp(self.wall_ns()).to_bytes(8, "big")

    def _publish(self, truncated: int, send_errors: int, bytes_in: int, bytes_out: int
                 ) -> None:
        """What the compiled loop counted before it waits (metrics read these live)."""
        self.truncated += truncated
        self.send_errors += send_errors
        counters = self.pipeline.counters
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out

    def _decision_failed(self, error: Exception) -> None:
        """A decision raised (a bug in a stage, not the packet's fault): count it, say so
        at most once a minute, and keep serving."""
        self.decision_errors += 1
        now_s = time.monotonic()
        if now_s - self._decision_error_logged_s >= DECISION_ERROR_LOG_S:
            self._decision_error_logged_s = now_s
            log.error("a packet's decision failed (%d so far; the datagrams of that batch "
                      "are dropped): %r", self.decision_errors, error)
            log.debug("the failed decision", exc_info=error)

    def _on_datagrams(self, sock: socket.socket) -> None:
        batched = self.batched.get(sock)
        if batched is not None:
            try:
                _, truncated, send_errors = batched.pump(
                    self._transmit_bytes, self.wall_ns, BATCH, self._wait_until_ns,
                    self._others(sock) if self._wait_until_ns else (), self._publish)
            except Exception as error:   # the batch is lost, the server is not
                self._decision_failed(error)
                return
            self.truncated += truncated
            self.send_errors += send_errors
            return
        decide = self.pipeline.decide
        responder = self.pipeline.responder
        counters = self.pipeline.counters
        for _ in range(BATCH):
            try:
                data, ancdata, flags, sockaddr = sock.recvmsg(RECV_BUFFER, _ANC_BUFFER)
            except BlockingIOError:
                return
            except OSError as error:  # ICMP errors surface here on some kernels
                log.debug("recvmsg: %s", error)
                continue
            now_ns = time.monotonic_ns()
            recv_ns, ttl = parse_ancillary(ancdata)
            if recv_ns is None:
                recv_ns = self.wall_ns()
            counters.bytes_in += len(data)
            if flags & socket.MSG_TRUNC:
                self.truncated += 1
                data = b""  # counted as malformed by the sanity stage
            try:
                reason, reply, signer = decide(data, packed_from_sockaddr(sockaddr),
                                               sockaddr[1], recv_ns, now_ns, ttl=ttl)
            except Exception as error:   # this datagram is dropped, the server is not
                self._decision_failed(error)
                continue
            if reply is None:
                continue
            if reason in _TIME_REASONS:
                reply = (reply[:40] + responder.served_ntp(self.wall_ns()).to_bytes(8, "big")
                         + reply[48:])
            if signer is not None:
                reply = signer(reply)
            try:
                sock.sendto(reply, sockaddr)
                counters.bytes_out += len(reply)
            except OSError as error:
                self.send_errors += 1
                log.debug("sendto %s: %s", sockaddr, error)
