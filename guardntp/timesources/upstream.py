"""``--clock upstream``: guardntp polls upstream servers itself (the edge).

What to believe is decided in :mod:`guardntp.timesources.selection` (pure):
per-source clock filters, majority intersection, combining, frequency, holdover,
the jump guard and leap seconds. This module does what needs sockets, clocks
and names:

* polls each source (one exchange per poll, four quick ones at start-up like
  chrony's ``iburst``), on its own poll interval;
* honours Kiss-o'-Death: RATE at least doubles that source's poll (and raises it
  to the poll the KoD asks for), DENY or RSTR removes the source for good;
* resolves each name to up to ``max_sources`` addresses (a pool), re-resolves
  it now and then, and replaces members that stay unreachable or falseticking;
* notices when the system clock is stepped under it (``CLOCK_REALTIME`` moves
  against ``CLOCK_MONOTONIC``) and keeps the served time continuous;
* steps the system clock only when explicitly allowed, as root, beyond 25 s, and
  only once a majority has confirmed the offset for the stepout interval.

The measured offset is *added to the time we serve*; the system clock is left
alone otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import client
from ..clock import ClockState, unsynchronized
from ..config import ClockConfig
from ..netaddr import parse_host_port
from ..timestamps import NS_PER_S, short_to_ns
from ..wire import STRATUM_UNSPECIFIED, refid_from_ipv4
from . import SyncWatch
from .selection import (
    DEFAULT_MAX_DISTANCE_NS,
    DEFAULT_STEPOUT_NS,
    FALSETICKER,
    OUTLIER,
    SELECTED,
    SYSTEM_STEP_THRESHOLD_NS,
    UNUSABLE,
    FilterSample,
    KeeperSettings,
    TimeKeeper,
    phi_ns,
    sample_dispersion_ns,
    seconds_text,
)

log = logging.getLogger("guardntp.clock")

#: The original design's threshold: offsets beyond it are stepped (when allowed).
STEP_THRESHOLD_NS = SYSTEM_STEP_THRESHOLD_NS
#: RFC 5905 MINPOLL is 16 s and the default poll 64 s; public servers ask for no less.
DEFAULT_POLL_S = 64.0
#: Exchanges per source per poll (each one goes into the source's 8-stage filter).
DEFAULT_SAMPLES = 1
#: With every source lost, serve on in holdover this long (about 15 polls).
DEFAULT_LOST_AFTER_S = 1024.0
#: chrony's ``maxsources`` for a pool: addresses used per name.
DEFAULT_MAX_SOURCES = 4
#: chrony's iburst: quick exchanges at start-up, ``sample_spacing_s`` apart.
IBURST_EXCHANGES = 4
#: RFC 5905 MAXPOLL (36 h): a RATE KoD never pushes a source beyond it.
MAX_POLL_S = float(1 << 17)
#: A source is unreachable after this many polls without an answer (RFC 5905's
#: 8-bit reach register), and a pool member is replaced after this many polls of
#: being unreachable or a falseticker.
REPLACE_AFTER_POLLS = 8
#: A jump of CLOCK_REALTIME against CLOCK_MONOTONIC beyond this is a clock step.
CLOCK_STEP_NOTICE_NS = 1_000_000
#: Kiss codes after which a source is never asked again (RFC 5905 §7.4).
FATAL_KISS_CODES = ("DENY", "RSTR")

Resolver = Callable[[str, int], list[str]]


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


def clock_state_from(best: Measurement | None, now_ns: int, lost_after_ns: int, offset_ns: int,
                     precision: int) -> ClockState:
    """What one measurement alone would let us serve (pure): stratum + 1, the
    upstream's address as refid, root delay and dispersion grown by this hop."""
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
        root_dispersion_ns=short_to_ns(packet.root_dispersion)
        + sample_dispersion_ns(packet.precision, precision, best.sample.delay_ns)
        + phi_ns(offset_ns),   # the reference below is on the served scale
        reference_unix_ns=best.taken_unix_ns + offset_ns, leap=packet.leap,
        offset_ns=offset_ns, source="upstream",
        detail=f"upstream {best.upstream.host} ({best.address})")


def parse_upstream(text: str) -> Upstream:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; BadAddress (a
    ValueError) for anything else (``config.py`` has refused those already)."""
    return Upstream(*parse_host_port(text))


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order, without repeats."""
    addresses: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM):
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def source_name(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(slots=True)
class _Source:
    upstream: Upstream
    address: str
    poll_s: float
    next_poll_at: float = 0.0
    fresh: bool = True
    #: Consecutive polls without a usable answer, and as a falseticker.
    silent_polls: int = 0
    falseticker_polls: int = 0
    last_error: str = ""
    last_sample: Measurement | None = None

    @property
    def name(self) -> str:
        return source_name(self.address, self.upstream.port)


@dataclass(slots=True)
class _Pool:
    upstream: Upstream
    resolved_at: float | None = None
    #: Addresses never to use again (a DENY/RSTR KoD) or replaced for cause.
    refused: set[str] = field(default_factory=set)


class UpstreamClock:
    name = "upstream"

    def __init__(self, upstreams: list[Upstream], poll_s: float = DEFAULT_POLL_S,
                 samples: int = DEFAULT_SAMPLES, lost_after_s: float = DEFAULT_LOST_AFTER_S,
                 allow_step: bool = False, precision: int = -20,
                 sample_spacing_s: float = 2.0, timeout_s: float = 2.0, *,
                 max_sources: int = DEFAULT_MAX_SOURCES,
                 max_distance_s: float = DEFAULT_MAX_DISTANCE_NS / NS_PER_S,
                 stepout_s: float = DEFAULT_STEPOUT_NS / NS_PER_S, allow_panic: bool = False,
                 iburst: bool = True, resolver: Resolver = resolve_addresses,
                 resolve_interval_s: float | None = None,
                 replace_after_polls: int = REPLACE_AFTER_POLLS,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
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
        self.max_sources = max_sources
        self.iburst = iburst
        self.resolver = resolver
        self.resolve_interval_s = resolve_interval_s if resolve_interval_s is not None \
            else REPLACE_AFTER_POLLS * poll_s
        self.replace_after_polls = replace_after_polls
        self.clock_ns = clock_ns
        self.keeper = TimeKeeper(KeeperSettings(
            max_distance_ns=int(max_distance_s * NS_PER_S),
            stepout_ns=int(stepout_s * NS_PER_S), allow_panic=allow_panic,
            lost_after_ns=self.lost_after_ns,
            unreachable_after_ns=min(self.lost_after_ns,
                                     int(REPLACE_AFTER_POLLS * poll_s * NS_PER_S))))
        self.sources: list[_Source] = []
        self.pools = [_Pool(upstream) for upstream in upstreams]
        self.watch = SyncWatch(log)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock_base_ns = self._realtime_minus_monotonic()
        self._last_summary: tuple[tuple[str, str], ...] = ()
        self._step_note = ""
        self.polls = 0

    @classmethod
    def from_config(cls, clock: ClockConfig, precision: int) -> UpstreamClock:
        """The upstream clock a ``[clock]`` section asks for."""
        return cls([parse_upstream(text) for text in clock.upstreams], clock.poll,
                   clock.samples, clock.lost_after, clock.allow_step, precision,
                   max_sources=clock.max_sources, max_distance_s=clock.max_distance,
                   stepout_s=clock.stepout, allow_panic=clock.allow_panic,
                   iburst=clock.iburst)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upstream-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (OSError, socket.gaierror) as error:  # keep polling whatever happens
                log.warning("upstream poll failed: %s", error)
            self._stop.wait(self._seconds_to_next_poll())

    def _seconds_to_next_poll(self) -> float:
        now = time.monotonic()
        due = [source.next_poll_at - now for source in self.sources]
        resolve = [self.resolve_interval_s - (now - pool.resolved_at)
                   for pool in self.pools if pool.resolved_at is not None
                   and self._members(pool) < self._wanted(pool)]
        waits = due + resolve
        return min(max(0.05, min(waits)) if waits else self.poll_s, self.poll_s)

    # ---------------------------------------------------------------- served state

    def state(self, now_ns: int) -> ClockState:
        with self._lock:
            self._notice_clock_step()
            peer = self._source_named(self.keeper.system_peer)
            refid = refid_from_ipv4(peer.address) if peer is not None else b"\0\0\0\0"
            state = self.keeper.clock_state(now_ns, self.precision, refid)
        self.watch.observe(state)
        return state

    def selection_report(self) -> list[dict[str, object]]:
        """One plain dict per source: the selection's verdict and why, plus polling facts
        (``upstream`` as configured, ``poll_s``, ``last_error``)."""
        with self._lock:
            rows = self.keeper.report()
            by_name = {source.name: source for source in self.sources}
            for row in rows:
                source = by_name.get(str(row["source"]))
                row["upstream"] = source.upstream.host if source is not None else ""
                row["poll_s"] = source.poll_s if source is not None else None
                row["last_error"] = source.last_error if source is not None else ""
            return rows

    def selection_summary(self) -> dict[str, object]:
        """Bounded figures for metrics: sources per status, the frequency estimate, the
        system peer, and a jump the majority reports but we do not follow (yet)."""
        with self._lock:
            counts = {status: 0 for status in (SELECTED, FALSETICKER, OUTLIER, UNUSABLE)}
            for report in self.keeper.last_selection.reports:
                counts[report.status] += 1
            pending = self.keeper.pending
            return {"sources": counts, "frequency_ppm": self.keeper.frequency * 1e6,
                    "system_peer": self.keeper.system_peer,
                    "pending_jump_s": None if pending is None else pending.offset_ns / NS_PER_S,
                    "note": self.keeper.note}

    # ---------------------------------------------------------------- polling

    def poll_once(self) -> Measurement | None:
        """One round: resolve what needs it, poll every source that is due, select.
        Returns the system peer's latest measurement (None when nothing is selected)."""
        self._resolve_pools(time.monotonic())
        now = time.monotonic()
        due = [source for source in self.sources if source.next_poll_at <= now]
        exchanges = {id(source): max(self.samples, IBURST_EXCHANGES
                                     if self.iburst and source.fresh else 1)
                     for source in due}
        answered: set[int] = set()
        for index in range(max(exchanges.values(), default=0)):
            if index and self._stop.wait(self.sample_spacing_s):
                break
            for source in due:
                # A RATE KoD moved next_poll_at on: no more of this round's burst for it.
                if index < exchanges[id(source)] and source in self.sources \
                        and source.next_poll_at <= now and self._exchange(source):
                    answered.add(id(source))
            self._select()   # after each burst round, so start-up is synchronised quickly
        for source in due:
            source.fresh = False
            source.next_poll_at = max(source.next_poll_at, time.monotonic() + source.poll_s)
            source.silent_polls = 0 if id(source) in answered else source.silent_polls + 1
        self._count_falsetickers(due)
        self.polls += 1
        with self._lock:
            peer = self._source_named(self.keeper.system_peer)
            selected = self.keeper.last_selection.offset_ns is not None
        return peer.last_sample if peer is not None and selected else None

    def _exchange(self, source: _Source) -> bool:
        """One exchange with ``source``; True when it gave a sample."""
        where = source.name
        try:
            sample = client.exchange(source.address, source.upstream.port,
                                     timeout_s=self.timeout_s, clock_ns=self.clock_ns)
        except client.KissOfDeath as kod:
            self._kiss_of_death(source, kod)
            return False
        except (OSError, client.BogusReply) as error:
            source.last_error = str(error)
            log.debug("upstream %s: %s", where, error)
            return False
        taken = self.clock_ns()
        packet = sample.packet
        source.last_error = ""
        source.last_sample = Measurement(source.upstream, source.address, sample, taken)
        with self._lock:
            self._notice_clock_step()
            self.keeper.add_sample(where, FilterSample(
                offset_ns=sample.offset_ns, delay_ns=sample.delay_ns,
                dispersion_ns=sample_dispersion_ns(packet.precision, self.precision,
                                                   sample.delay_ns),
                taken_ns=taken, root_delay_ns=short_to_ns(packet.root_delay),
                root_dispersion_ns=short_to_ns(packet.root_dispersion),
                stratum=packet.stratum, leap=packet.leap))
        return True

    def _kiss_of_death(self, source: _Source, kod: client.KissOfDeath) -> None:
        code = kod.code
        if code in FATAL_KISS_CODES:
            reason = f"Kiss-o'-Death {code}: removed, not asked again"
            log.warning("upstream %s (%s) sent Kiss-o'-Death %s: removing it", source.name,
                        source.upstream.host, code)
            self._remove(source, reason, refuse=True)
        elif code == "RATE":
            asked = float(1 << max(0, min(kod.packet.poll, 17)))
            source.poll_s = min(MAX_POLL_S, max(2 * source.poll_s, asked))
            source.next_poll_at = time.monotonic() + source.poll_s
            with self._lock:
                self.keeper.unreachable_after_ns[source.name] = max(
                    self.keeper.settings.unreachable_after_ns,
                    int(REPLACE_AFTER_POLLS * source.poll_s * NS_PER_S))
            source.last_error = f"Kiss-o'-Death RATE: poll raised to {source.poll_s:g} s"
            log.warning("upstream %s sent Kiss-o'-Death RATE: polling it every %g s",
                        source.name, source.poll_s)
        else:
            source.last_error = f"Kiss-o'-Death {code}"
            log.info("upstream %s sent Kiss-o'-Death %s", source.name, code)

    def _remove(self, source: _Source, reason: str, refuse: bool) -> None:
        for pool in self.pools:
            if pool.upstream == source.upstream and refuse:
                pool.refused.add(source.address)
        with self._lock:  # the server thread reads the list in state()
            if source in self.sources:
                self.sources.remove(source)
            self.keeper.remove_source(source.name, reason)

    def _select(self) -> None:
        with self._lock:
            self._notice_clock_step()
            now = self.clock_ns()
            selection = self.keeper.update(now)
            summary = tuple((r.source, r.status) for r in selection.reports)
            changed = summary != self._last_summary
            self._last_summary = summary
            note = self.keeper.note
            offset = self.keeper.offset_at(now)
        if changed:
            parts = [f"{r.source} {r.status} ({r.reason})" for r in selection.reports]
            combined = "" if selection.offset_ns is None else \
                f"; offset {seconds_text(selection.offset_ns)}"
            log.info("upstream selection: %s%s%s", ", ".join(parts) or "no sources", combined,
                     f"; {note}" if note else "")
        if self.allow_step:
            self._maybe_step(offset)

    def _count_falsetickers(self, polled: list[_Source]) -> None:
        statuses = {r.source: r.status for r in self.keeper.last_selection.reports}
        for source in polled:
            if statuses.get(source.name) == FALSETICKER:
                source.falseticker_polls += 1
            else:
                source.falseticker_polls = 0

    # ---------------------------------------------------------------- pools

    def _wanted(self, pool: _Pool) -> int:
        return 1 if is_address(pool.upstream.host) else self.max_sources

    def _members(self, pool: _Pool) -> int:
        return sum(1 for source in self.sources if source.upstream == pool.upstream)

    def _resolve_pools(self, now: float) -> None:
        """Fill each name up to its share of addresses; replace members that stayed
        unreachable or falseticking for ``replace_after_polls`` polls."""
        for pool in self.pools:
            members = [s for s in self.sources if s.upstream == pool.upstream]
            failing = [s for s in members
                       if max(s.silent_polls, s.falseticker_polls) >= self.replace_after_polls]
            short = len(members) - len(failing) < self._wanted(pool)
            if not short:
                continue
            # A name with no usable member at all is retried every poll, not every
            # resolve interval: until then there is nothing to serve.
            interval = self.resolve_interval_s if len(members) > len(failing) else self.poll_s
            if pool.resolved_at is not None and now - pool.resolved_at < interval:
                continue
            pool.resolved_at = now
            if is_address(pool.upstream.host):
                addresses = [pool.upstream.host]
            else:
                try:
                    addresses = self.resolver(pool.upstream.host, pool.upstream.port)
                except (OSError, UnicodeError) as error:
                    log.warning("upstream %s: cannot resolve: %s", pool.upstream.host, error)
                    continue
            in_use = {s.address for s in self.sources if s.upstream.port == pool.upstream.port}
            fresh = [a for a in addresses if a not in in_use and a not in pool.refused]
            for old in failing:
                if not fresh:
                    break
                why = "unreachable" if old.silent_polls >= self.replace_after_polls \
                    else "a falseticker"
                log.warning("upstream %s: replacing %s, %s for %d polls, with %s",
                            pool.upstream.host, old.name, why, self.replace_after_polls,
                            source_name(fresh[0], pool.upstream.port))
                pool.refused.add(old.address)
                self._remove(old, "", refuse=False)
                self._add(pool, fresh.pop(0))
            while fresh and self._members(pool) < self._wanted(pool):
                self._add(pool, fresh.pop(0))

    def _add(self, pool: _Pool, address: str) -> None:
        source = _Source(pool.upstream, address, self.poll_s)
        with self._lock:
            self.sources.append(source)
            self.keeper.add_source(source.name)

    def _source_named(self, name: str) -> _Source | None:
        return next((source for source in self.sources if source.name == name), None)

    # ---------------------------------------------------------------- the system clock

    @staticmethod
    def _realtime_minus_monotonic() -> int:
        return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()

    def _notice_clock_step(self) -> None:
        """If the system clock was stepped (by us, an operator, or a kernel leap second),
        shift everything so the served time does not move with it. Holds the lock."""
        base = self._realtime_minus_monotonic()
        step = base - self._clock_base_ns
        if abs(step) > CLOCK_STEP_NOTICE_NS:
            self.keeper.clock_stepped(step)
            log.warning("the system clock was stepped by %s; served time kept continuous",
                        seconds_text(step))
        self._clock_base_ns = base

    def _maybe_step(self, offset_ns: int) -> bool:
        """Step the system clock by ``offset_ns`` when allowed, as root, beyond 25 s, and
        confirmed by a majority for the stepout interval; True when stepped."""
        if not self.allow_step or abs(offset_ns) <= STEP_THRESHOLD_NS:
            return False
        with self._lock:
            now = self.clock_ns()
            advice, why = self.keeper.step_advice(now, self.allow_step, os.geteuid() == 0)
            if not advice:
                if why != self._step_note:  # once per reason, not every round
                    log.info("offset %s exceeds 25 s; not stepping the clock: %s; serving "
                             "corrected time instead", seconds_text(offset_ns), why)
                self._step_note = why
                return False
            step = self.keeper.offset_at(now)
            time.clock_settime_ns(time.CLOCK_REALTIME,
                                  time.clock_gettime_ns(time.CLOCK_REALTIME) + step)
            self._notice_clock_step()
        log.warning("stepped the system clock by %s", seconds_text(step))
        return True
