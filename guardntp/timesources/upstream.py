"""``--clock upstream``: guardntp polls upstream servers itself (the original design).

Each round sends a few requests to every upstream and keeps the lowest-delay
sample of each (RFC 5905's clock filter in its simplest form); the upstream with
the smallest root distance wins. The measured offset is *added to the time we
serve*; the system clock is stepped only when explicitly allowed, when we have
the privilege, and when the offset exceeds 25 s (the original design's
threshold). If no upstream has answered for ``lost_after_s``, replies go LI=3.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from .. import client
from ..clock import ClockState, unsynchronized
from ..timestamps import NS_PER_S, short_to_ns
from ..wire import STRATUM_UNSPECIFIED, refid_from_ipv4

log = logging.getLogger("guardntp.clock")

#: The original design's threshold: offsets beyond it are stepped (when allowed).
STEP_THRESHOLD_NS = 25 * NS_PER_S
#: RFC 5905 MINPOLL is 16 s and the default poll 64 s; public servers ask for no less.
DEFAULT_POLL_S = 64.0
DEFAULT_SAMPLES = 4
#: After this long without an answer the source counts as lost (about 15 polls).
DEFAULT_LOST_AFTER_S = 1024.0


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = 123


@dataclass(frozen=True, slots=True)
class Measurement:
    upstream: Upstream
    address: str
    sample: client.Sample
    taken_unix_ns: int


def choose(measurements: list[Measurement]) -> Measurement | None:
    """The measurement with the smallest root distance (pure)."""
    if not measurements:
        return None
    return min(measurements, key=lambda m: m.sample.root_distance_ns)


def clock_state_from(best: Measurement | None, now_ns: int, lost_after_ns: int, offset_ns: int,
                     precision: int) -> ClockState:
    """What to serve given the last chosen measurement (pure)."""
    if best is None:
        return unsynchronized("upstream", "no upstream has answered yet", precision)
    if now_ns - best.taken_unix_ns > lost_after_ns:
        return unsynchronized("upstream", "upstream lost: no answer for "
                              f"{(now_ns - best.taken_unix_ns) // NS_PER_S} s", precision)
    packet = best.sample.packet
    stratum = min(packet.stratum + 1, STRATUM_UNSPECIFIED)
    return ClockState(
        synchronized=stratum < STRATUM_UNSPECIFIED, stratum=stratum,
        refid=refid_from_ipv4(best.address), precision=precision,
        root_delay_ns=short_to_ns(packet.root_delay) + best.sample.delay_ns,
        root_dispersion_ns=short_to_ns(packet.root_dispersion) + (1 << 10),
        reference_unix_ns=best.taken_unix_ns, leap=packet.leap, offset_ns=offset_ns,
        source="upstream", detail=f"upstream {best.upstream.host} ({best.address})",
    )


def parse_upstream(text: str) -> Upstream:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return Upstream(host, int(rest[1:]) if rest.startswith(":") else 123)
    if text.count(":") == 1:
        host, port = text.split(":")
        return Upstream(host, int(port))
    return Upstream(text, 123)


class UpstreamClock:
    name = "upstream"

    def __init__(self, upstreams: list[Upstream], poll_s: float = DEFAULT_POLL_S,
                 samples: int = DEFAULT_SAMPLES, lost_after_s: float = DEFAULT_LOST_AFTER_S,
                 allow_step: bool = False, precision: int = -20,
                 sample_spacing_s: float = 2.0, timeout_s: float = 2.0) -> None:
        if not upstreams:
            raise ValueError("the upstream clock needs at least one upstream server")
        self.upstreams = upstreams
        self.poll_s = poll_s
        self.samples = samples
        self.lost_after_ns = int(lost_after_s * NS_PER_S)
        self.allow_step = allow_step
        self.precision = precision
        self.sample_spacing_s = sample_spacing_s
        self.timeout_s = timeout_s
        self._best: Measurement | None = None
        self._offset_ns = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upstream-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def state(self, now_ns: int) -> ClockState:
        with self._lock:
            return clock_state_from(self._best, now_ns, self.lost_after_ns, self._offset_ns,
                                    self.precision)

    def poll_once(self) -> Measurement | None:
        """One round over all upstreams; updates the served offset. Returns the choice."""
        measurements: list[Measurement] = []
        for upstream in self.upstreams:
            try:
                _, sockaddr = client.resolve(upstream.host, upstream.port)
                address = str(sockaddr[0])
                best, _ = client.query(address, upstream.port, samples=self.samples,
                                       timeout_s=self.timeout_s, spacing_s=self.sample_spacing_s)
            except (OSError, client.BogusReply, client.KissOfDeath) as error:
                log.warning("upstream %s:%d: %s", upstream.host, upstream.port, error)
                continue
            measurements.append(Measurement(upstream, address, best, time.time_ns()))
        chosen = choose(measurements)
        self.polls += 1
        if chosen is not None:
            offset_ns = chosen.sample.offset_ns
            if self._maybe_step(offset_ns):
                offset_ns = 0
            with self._lock:
                self._best = chosen
                self._offset_ns = offset_ns
            log.info("upstream %s: offset %+.6f s, delay %.6f s, stratum %d",
                     chosen.address, client.seconds(offset_ns),
                     client.seconds(chosen.sample.delay_ns), chosen.sample.stratum)
        return chosen

    def _maybe_step(self, offset_ns: int) -> bool:
        if abs(offset_ns) <= STEP_THRESHOLD_NS or not self.allow_step:
            return False
        if os.geteuid() != 0:
            log.warning("offset %+.3f s exceeds 25 s but we lack the privilege to step the "
                        "clock; serving corrected time instead", client.seconds(offset_ns))
            return False
        time.clock_settime_ns(time.CLOCK_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME)
                              + offset_ns)
        log.warning("stepped the system clock by %+.3f s", client.seconds(offset_ns))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (OSError, socket.gaierror) as error:  # keep polling whatever happens
                log.warning("upstream poll failed: %s", error)
            self._stop.wait(self.poll_s)
