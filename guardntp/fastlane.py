"""The compiled packet loop: ``recvmmsg`` -> decide -> ``sendmmsg`` in C.

Rule: ``guardntp/_fastlane.c`` decides every packet, exactly as
:meth:`Pipeline.decide` (the reference model) would: the sanity stage for every
length and tail, reflection ports, the access list's every action, the auth stage
(a MAC through ``Pipeline.verify_mac``; NTS through the NTS stage's ``claims`` and
``decide``), first sightings (the source table while it has room, the newcomer ring
once it is full, promotion at a source's second request, with the tables' own rules,
``filter/buckets.py``), and a source within or over its buckets: answered, leaked,
sent a RATE KoD or dropped. Both read the monotonic clock within
``pipeline.EARLIEST_NS..LATEST_NS``, so no time leaves 64 bits. There is no
per-packet handoff: a record the filter did not write is an error (the server drops
that batch and counts it), never a packet for Python. Only where the pipeline's
tables are Python's (no compiled ``AddressTable`` or ring) or the policy disables
the core (``LanePolicy.disabled``, for tests that watch every decision) does the
loop call ``Pipeline.decide`` for every packet, and then it is only the socket
layer. It reads and updates the pipeline's own records and counters, so
``guardntp clients``, metrics, reload and the blocklist see one state.
What it needs of the pipeline it is handed as one typed policy,
``Pipeline.lane_policy()`` (``filter/lane.py``), again whenever
``Pipeline.config_version`` moves.
``tests/test_fastlane.py`` and ``tools/fuzz_fastlane.py`` feed random traffic
through both and compare replies, counters and records.

Why: on one core the interpreter's per-packet cost (4-5 us) is what kept guardntp
at ~0.4x chronyd's answer rate; compiled, it answers at 1.06-1.22x (``docs/benchmarks.md``).

The extension is built by ``pip install`` where a C compiler is present; it is
the implementation. Without it, or with ``GUARDNTP_NO_FASTLANE=1``, the server
falls back to its plain one-``recvmsg``-per-packet loop in Python
(``guardntp/server.py``), several times slower, and says so at start.
:func:`available` says which; the sockets both loops read are set up by
``server.open_socket`` (kernel receive timestamps, arrival TTL / hop limit).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .filter.pipeline import Pipeline

try:
    from . import _fastlane
except ImportError:  # built without a C compiler: server.py's recvmsg loop serves
    _fastlane = None  # type: ignore[assignment]

#: Messages per recvmmsg call. A request waits for its whole batch to be decided
#: before its reply goes out; the system-call cost per packet is already ~1/64.
BATCH_SIZE = 64
#: Replies per sendmmsg, each chunk with a transmit timestamp read just before it
#: (``STAMP_EVERY`` in ``_fastlane.c``; stated here for tests).
STAMP_EVERY = 16
#: Larger than any NTP packet we accept (48 + extension fields + MAC); longer is cut.
#: Both loops use it: the compiled one's slot, the Python loop's recvmsg size.
RECV_BUFFER = 2048

def unavailable_because() -> str | None:
    """Why the compiled loop cannot be used here, for the startup log line (None: it can)."""
    if _fastlane is None:
        return "guardntp._fastlane was not built (no C compiler at install?)"
    if os.environ.get("GUARDNTP_NO_FASTLANE"):
        return "GUARDNTP_NO_FASTLANE is set"
    return None


def available(sock: socket.socket | None = None) -> bool:
    """Can :class:`FastLane` serve ``sock`` (a Linux UDP socket, IPv4 or IPv6)?"""
    if unavailable_because() is not None:
        return False
    return sock is None or (sock.type == socket.SOCK_DGRAM
                            and sock.family in (socket.AF_INET, socket.AF_INET6))


class FastLane:
    """The compiled loop for one socket, kept in step with one pipeline's settings."""

    def __init__(self, sock: socket.socket, pipeline: Pipeline, batch: int = BATCH_SIZE,
                 slot: int = RECV_BUFFER) -> None:
        if _fastlane is None:
            raise RuntimeError("guardntp._fastlane is not built")
        self.sock = sock   # the Lane holds only the descriptor: keep the socket alive
        self.pipeline = pipeline
        self.lane = _fastlane.Lane(sock.fileno(), sock.family == socket.AF_INET6, batch, slot)
        self._version = -1

    def _configure(self) -> None:
        pipeline = self.pipeline
        if self._version != pipeline.config_version:
            self.lane.configure(pipeline.lane_policy())
            self._version = pipeline.config_version

    def pump(self, transmit: Callable[[], bytes], wall_ns: Callable[[], int], budget: int,
             wait_until_ns: int = 0, watch: tuple[int, ...] = (),
             publish: Callable[[int, int, int, int], None] | None = None
             ) -> tuple[int, int, int]:
        """Receive, decide and reply until no datagram waits or ``budget`` were
        handled: (datagrams handled, truncated datagrams, failed sends).

        ``transmit()`` gives the 8 bytes of the transmit timestamp to serve now, read
        just before each ``sendmmsg`` of up to :data:`STAMP_EVERY` replies;
        ``wall_ns()`` stands in for a missing kernel receive timestamp.

        With ``wait_until_ns`` (monotonic), an empty socket is waited on in C, the
        GIL released, until that time or until one of the ``watch`` descriptors
        (the server loop's others) becomes readable: below saturation that saves a
        trip through the Python event loop per wake-up. Before each wait the
        pipeline's counters are brought up to date and ``publish(truncated,
        failed sends, bytes in, bytes out)`` gets the rest counted so far; the
        return value and the byte counters then carry only what followed."""
        self._configure()
        handled, truncated, send_errors, bytes_in, bytes_out = self.lane.pump(
            wall_ns, transmit, budget, wait_until_ns, watch, publish)
        counters = self.pipeline.counters
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out
        return handled, truncated, send_errors

    def decide_one(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int,
                   ttl: int = -1) -> tuple[int, bytes | None, object, bool]:
        """One datagram through the compiled decision, no socket touched (tests, the
        in-process replay): (reason, reply, signer, decided in C: False only where
        the core is disabled and ``Pipeline.decide`` decided)."""
        self._configure()
        return self.lane.decide_one(data, packed, port, recv_ns, now_ns, ttl)

    @property
    def fast_decisions(self) -> int:
        """Time replies the compiled path decided itself."""
        return self.lane.fast_decisions

    @property
    def first_sightings(self) -> int:
        """Requests from sources the source table did not hold, decided in C (first
        requests, newcomers in the ring, promotions)."""
        return self.lane.first_sightings

    @property
    def promotions(self) -> int:
        """Of those, returning newcomers the compiled path moved into the source table."""
        return self.lane.promotions
