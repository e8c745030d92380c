"""Which upstreams to believe, and what time to serve from them (pure).

Nothing here reads a clock or a socket: every time is an argument (``now_ns``,
the local system clock in Unix ns). :mod:`guardntp.timesources.upstream` is the
edge that polls servers and feeds the samples in.

The pipeline, after RFC 5905 and ntpd/chrony practice:

* :class:`ClockFilter` (RFC 5905 §10): per source, the last 8 samples; the
  lowest-delay one is the source's estimate, its jitter is the RMS of the
  other samples' offsets from it, and its dispersion grows by 15 ppm/s (PHI)
  from when it was taken.
* :func:`select` (RFC 5905 §11.2.1-11.2.3, as ntpd implements it): each
  source's correctness interval is offset ± root distance. The interval
  covered by a majority wins; a source whose interval misses it is a
  falseticker, whatever stratum or distance it claims. No majority (two
  sources that disagree) selects nothing. Survivors are clustered and
  combined, weighted by 1/root distance; the leap indicator is theirs by
  majority.
* :class:`TimeKeeper`: the served offset and the local clock's frequency
  error, so the served time tracks the upstreams between polls; holdover when
  every source is lost; a jump guard (a jump beyond 128 ms is followed only
  once a majority has confirmed it for the stepout interval, one beyond the
  panic threshold never without the operator's say-so); leap seconds applied
  at the instant they are due.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..clock import MAX_DISPERSION_NS, ClockState, unsynchronized
from ..timestamps import NS_PER_S
from ..wire import STRATUM_UNSPECIFIED, Leap

#: RFC 5905 PHI: the frequency tolerance, so dispersion grows 15 ns per second of age.
PHI_PPM = 15
#: RFC 5905 §10: clock filter stages.
FILTER_STAGES = 8
#: chrony's ``maxdistance``: a source further from its root than this is not usable.
DEFAULT_MAX_DISTANCE_NS = 3 * NS_PER_S
#: ntpd's STEPT: a change of the selected offset beyond this is a jump, not noise.
STEP_THRESHOLD_NS = 128_000_000
#: How long a majority must agree on a jump before it is followed (ntpd: 900 s).
DEFAULT_STEPOUT_NS = 300 * NS_PER_S
#: ntpd's panic threshold: offsets this large are never followed without the operator.
PANIC_THRESHOLD_NS = 1000 * NS_PER_S
#: The original design's threshold for stepping the system clock (when allowed, as root).
SYSTEM_STEP_THRESHOLD_NS = 25 * NS_PER_S
#: The frequency estimate is bounded like ntpd's (NTP_MAXFREQ, 500 ppm).
MAX_FREQUENCY = 500e-6
#: A source's own frequency is believed only when its regression is this certain.
MAX_FREQUENCY_ERROR = 10e-6
#: Upstreams are disciplined clocks: one whose rate differs this much from the
#: majority's (as seen against our local clock) is broken, however close it still is.
MAX_SOURCE_DRIFT = 50e-6
#: ntpd's ``mindist``: every correctness interval is at least this wide each side,
#: so two honest sources a few microseconds apart on a fast network still agree.
MIN_DISTANCE_NS = 1_000_000
#: RFC 5905 NMIN: clustering stops with this many survivors.
MIN_CLUSTER_SURVIVORS = 3
#: Samples this close to a leap second (either side) are ambiguous and dropped.
LEAP_GUARD_NS = 2 * NS_PER_S

SELECTED = "selected"
FALSETICKER = "falseticker"
OUTLIER = "outlier"
UNUSABLE = "unusable"


def phi_ns(age_ns: int) -> int:
    """Dispersion accrued over ``age_ns`` at PHI."""
    return max(0, age_ns) * PHI_PPM // 1_000_000


def sample_dispersion_ns(peer_precision: int, local_precision: int, delay_ns: int) -> int:
    """RFC 5905 §8: a fresh sample's dispersion: both clocks' precision plus PHI over the
    round trip."""
    return (math.ceil(2.0 ** peer_precision * NS_PER_S)
            + math.ceil(2.0 ** local_precision * NS_PER_S) + phi_ns(delay_ns))


def seconds_text(ns: int) -> str:
    """A short human form of a duration or offset (``+1.5 ms``, ``16 s``)."""
    magnitude = abs(ns)
    if magnitude >= NS_PER_S:
        return f"{ns / NS_PER_S:+.3f} s"
    if magnitude >= 1_000_000:
        return f"{ns / 1e6:+.3f} ms"
    return f"{ns / 1e3:+.1f} us"


# ----------------------------------------------------------------------- the filter

@dataclass(frozen=True, slots=True)
class FilterSample:
    """One exchange with one source. Times are the local clock's (Unix ns)."""

    offset_ns: int
    delay_ns: int
    #: Dispersion when taken (:func:`sample_dispersion_ns`).
    dispersion_ns: int
    taken_ns: int
    root_delay_ns: int = 0
    root_dispersion_ns: int = 0
    stratum: int = 2
    leap: Leap = Leap.NONE


@dataclass(frozen=True, slots=True)
class SourceEstimate:
    """What a source's filter says now; offset propagated to ``now`` at the local
    frequency estimate, dispersion grown since the sample was taken."""

    source: str
    offset_ns: int
    delay_ns: int
    dispersion_ns: int
    jitter_ns: int
    root_delay_ns: int
    root_dispersion_ns: int
    stratum: int
    leap: Leap
    taken_ns: int

    @property
    def root_distance_ns(self) -> int:
        """RFC 5905 root distance: half the total delay plus total dispersion plus jitter."""
        return (max(MIN_DISTANCE_NS, self.root_delay_ns + self.delay_ns) // 2
                + self.root_dispersion_ns + self.dispersion_ns + self.jitter_ns)


class ClockFilter:
    """RFC 5905 §10 for one source: the last :data:`FILTER_STAGES` samples."""

    def __init__(self, stages: int = FILTER_STAGES) -> None:
        self.samples: deque[FilterSample] = deque(maxlen=stages)

    def add(self, sample: FilterSample) -> None:
        self.samples.append(sample)

    def shift(self, step_ns: int) -> None:
        """The local clock was stepped by ``step_ns``: offsets taken before shrink by it."""
        self.samples = deque((replace(s, offset_ns=s.offset_ns - step_ns,
                                      taken_ns=s.taken_ns + step_ns) for s in self.samples),
                             maxlen=self.samples.maxlen)

    def shift_before(self, instant_ns: int, step_ns: int) -> None:
        """Add ``step_ns`` to the offsets of samples taken before ``instant_ns`` (a leap
        second: the upstreams' time moved, ours did not)."""
        self.samples = deque((replace(s, offset_ns=s.offset_ns + step_ns)
                              if s.taken_ns < instant_ns else s for s in self.samples),
                             maxlen=self.samples.maxlen)

    @property
    def newest_ns(self) -> int | None:
        return self.samples[-1].taken_ns if self.samples else None

    def estimate(self, source: str, now_ns: int, frequency: float = 0.0) -> SourceEstimate | None:
        """The lowest-delay sample, propagated to ``now_ns``; None without samples."""
        if not self.samples:
            return None
        ordered = sorted(self.samples, key=lambda s: (s.delay_ns, -s.taken_ns))
        best = ordered[0]
        jitter_ns = 0
        if len(ordered) > 1:
            squares = sum(
                (s.offset_ns + round(frequency * (best.taken_ns - s.taken_ns)) - best.offset_ns)
                ** 2 for s in ordered[1:])
            jitter_ns = math.isqrt(squares // (len(ordered) - 1))
        return SourceEstimate(
            source=source,
            offset_ns=best.offset_ns + round(frequency * (now_ns - best.taken_ns)),
            delay_ns=best.delay_ns,
            dispersion_ns=min(MAX_DISPERSION_NS,
                              best.dispersion_ns + phi_ns(now_ns - best.taken_ns)),
            jitter_ns=jitter_ns, root_delay_ns=best.root_delay_ns,
            root_dispersion_ns=best.root_dispersion_ns, stratum=best.stratum,
            leap=self.samples[-1].leap, taken_ns=best.taken_ns)

    def frequency(self) -> tuple[float, float] | None:
        """Least-squares slope of offset over time and its standard error, or None with
        fewer than three samples or no time between them."""
        n = len(self.samples)
        if n < 3:
            return None
        t0 = self.samples[0].taken_ns
        xs = [(s.taken_ns - t0) / NS_PER_S for s in self.samples]
        ys = [s.offset_ns / NS_PER_S for s in self.samples]
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mean_x) ** 2 for x in xs)
        if sxx <= 0:
            return None
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
        residuals = sum((y - mean_y - slope * (x - mean_x)) ** 2
                        for x, y in zip(xs, ys, strict=True))
        return slope, math.sqrt(residuals / (n - 2) / sxx)


# ----------------------------------------------------------------------- selection

@dataclass(frozen=True, slots=True)
class SourceReport:
    """One line of the selection report: a source, what became of it, and why."""

    source: str
    status: str
    reason: str
    offset_ns: int | None = None
    root_distance_ns: int | None = None
    stratum: int | None = None
    system_peer: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source, "status": self.status, "reason": self.reason,
            "system_peer": self.system_peer, "stratum": self.stratum,
            "offset_s": None if self.offset_ns is None else self.offset_ns / NS_PER_S,
            "root_distance_s": (None if self.root_distance_ns is None
                                else self.root_distance_ns / NS_PER_S),
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of one selection: the combined offset, or why there is none."""

    reports: tuple[SourceReport, ...]
    offset_ns: int | None = None
    system_peer: SourceEstimate | None = None
    survivors: tuple[SourceEstimate, ...] = ()
    leap: Leap = Leap.NONE
    #: RMS of the survivors' offsets from the combined offset (RFC 5905 selection jitter).
    jitter_ns: int = 0
    #: The majority's intersection interval (low, high).
    interval: tuple[int, int] | None = None
    #: Why nothing was selected ("" when something was).
    failure: str = ""
    #: True when usable sources disagreed: no majority, so no time at all.
    disagreement: bool = False


def intersection(intervals: Sequence[tuple[int, int]]) -> tuple[int, int, int] | None:
    """(low, high, falsetickers allowed) of the interval that a majority of
    ``intervals`` (each (low, high)) covers, or None when no majority agrees.

    RFC 5905 §11.2.1 as ntpd does it: allow 0, 1, ... falsetickers while fewer
    than half; with ``allow`` of them, ``low`` is the lowest point covered by
    ``n - allow`` intervals and ``high`` the highest.
    """
    n = len(intervals)
    # (value, order): at a shared value a lower edge comes before an upper edge, so
    # touching intervals overlap.
    edges = sorted([(low, 0, +1) for low, _ in intervals]
                   + [(high, 1, -1) for _, high in intervals])
    allow = 0
    while 2 * allow < n:
        wanted = n - allow
        low = high = None
        count = 0
        for value, _, kind in edges:
            count += kind
            if count >= wanted:
                low = value
                break
        count = 0
        for value, _, kind in reversed(edges):
            count -= kind
            if count >= wanted:
                high = value
                break
        if low is not None and high is not None and low <= high:
            return low, high, allow
        allow += 1
    return None


def majority_leap(leaps: Iterable[Leap]) -> Leap:
    """A leap announcement counts only when more than half the survivors make it."""
    votes = list(leaps)
    for leap in (Leap.INSERT_SECOND, Leap.DELETE_SECOND):
        if 2 * sum(1 for vote in votes if vote is leap) > len(votes):
            return leap
    return Leap.NONE


def _selection_jitter(members: Sequence[SourceEstimate], of: SourceEstimate) -> float:
    if len(members) < 2:
        return 0.0
    return math.sqrt(sum((m.offset_ns - of.offset_ns) ** 2 for m in members)
                     / (len(members) - 1))


def select(estimates: Sequence[SourceEstimate], max_distance_ns: int = DEFAULT_MAX_DISTANCE_NS,
           unusable: Sequence[tuple[str, str]] = (),
           drifting: Sequence[tuple[str, str]] = ()) -> Selection:
    """Intersection, clustering and combining over ``estimates`` (pure).

    ``unusable`` are (source, reason) pairs already ruled out by the caller (no reply,
    Kiss-o'-Death...); ``drifting`` are sources whose rate the majority contradicts
    (:func:`drifting_sources`), reported as falsetickers.
    """
    reports: dict[str, SourceReport] = {
        name: SourceReport(name, UNUSABLE, reason) for name, reason in unusable}
    drift_reasons = dict(drifting)
    candidates: list[SourceEstimate] = []
    for estimate in estimates:
        if estimate.source in drift_reasons:
            reports[estimate.source] = SourceReport(
                estimate.source, FALSETICKER, drift_reasons[estimate.source],
                estimate.offset_ns, estimate.root_distance_ns, estimate.stratum)
            continue
        distance = estimate.root_distance_ns
        if estimate.stratum >= STRATUM_UNSPECIFIED or estimate.leap is Leap.UNSYNCHRONIZED:
            reason = "source is not synchronised"
        elif distance > max_distance_ns:
            reason = (f"root distance {seconds_text(distance)[1:]} over the maximum "
                      f"{seconds_text(max_distance_ns)[1:]}")
        else:
            candidates.append(estimate)
            continue
        reports[estimate.source] = SourceReport(estimate.source, UNUSABLE, reason,
                                                estimate.offset_ns, distance, estimate.stratum)

    def ordered() -> tuple[SourceReport, ...]:
        return tuple(reports[name] for name in sorted(reports))

    if not candidates:
        return Selection(ordered(), failure="no usable source")
    found = intersection([(c.offset_ns - c.root_distance_ns, c.offset_ns + c.root_distance_ns)
                          for c in candidates])
    if found is None:
        for c in candidates:
            reports[c.source] = SourceReport(
                c.source, FALSETICKER, f"no majority: {len(candidates)} sources disagree",
                c.offset_ns, c.root_distance_ns, c.stratum)
        return Selection(ordered(), failure=f"no majority among {len(candidates)} sources "
                         "that disagree", disagreement=True)
    low, high, _ = found
    survivors: list[SourceEstimate] = []
    for c in candidates:
        distance = c.root_distance_ns
        if c.offset_ns + distance < low or c.offset_ns - distance > high:
            reports[c.source] = SourceReport(
                c.source, FALSETICKER,
                f"offset {seconds_text(c.offset_ns)} ± {seconds_text(distance)[1:]} misses the "
                f"majority's interval {seconds_text(low)} .. {seconds_text(high)}",
                c.offset_ns, distance, c.stratum)
        else:
            survivors.append(c)

    # RFC 5905 §11.2.2: drop the survivor furthest from the rest while it stands out
    # more than the noisiest survivor's own jitter, keeping at least three.
    while len(survivors) > MIN_CLUSTER_SURVIVORS:
        spreads = [_selection_jitter(survivors, s) for s in survivors]
        worst = max(range(len(survivors)), key=lambda i: spreads[i])
        if spreads[worst] <= min(s.jitter_ns for s in survivors):
            break
        dropped = survivors.pop(worst)
        reports[dropped.source] = SourceReport(
            dropped.source, OUTLIER,
            f"clustered out: {seconds_text(round(spreads[worst]))[1:]} from the others",
            dropped.offset_ns, dropped.root_distance_ns, dropped.stratum)

    weights = [1.0 / max(1, s.root_distance_ns) for s in survivors]
    combined = round(sum(w * s.offset_ns for w, s in zip(weights, survivors, strict=True))
                     / sum(weights))
    # The majority asserts the truth lies in its interval: so does our estimate.
    combined = min(max(combined, low), high)
    peer = min(survivors, key=lambda s: s.stratum * max_distance_ns + s.root_distance_ns)
    jitter_ns = 0
    if len(survivors) > 1:
        jitter_ns = math.isqrt(sum((s.offset_ns - combined) ** 2 for s in survivors)
                               // (len(survivors) - 1))
    for s in survivors:
        reports[s.source] = SourceReport(
            s.source, SELECTED,
            "system peer" if s is peer else "combined",
            s.offset_ns, s.root_distance_ns, s.stratum, system_peer=s is peer)
    return Selection(ordered(), combined, peer, tuple(survivors),
                     majority_leap(s.leap for s in survivors), jitter_ns, (low, high))


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def drifting_sources(rates: dict[str, float], max_drift: float = MAX_SOURCE_DRIFT,
                     ) -> list[tuple[str, str]]:
    """(source, reason) for each source whose rate against the local clock differs from
    the median rate by more than ``max_drift``; needs three rates to tell who is wrong."""
    if len(rates) < 3:
        return []
    middle = median(list(rates.values()))
    return [(name, f"runs {(rate - middle) * 1e6:+.1f} ppm against the majority")
            for name, rate in sorted(rates.items()) if abs(rate - middle) > max_drift]


# ----------------------------------------------------------------- steps and jumps

@dataclass(frozen=True, slots=True)
class PendingJump:
    """A jump of the selected offset the majority reports but we do not follow yet."""

    offset_ns: int
    since_ns: int


@dataclass(frozen=True, slots=True)
class JumpDecision:
    follow: bool
    pending: PendingJump | None
    note: str = ""


def guard_jump(tracked_ns: int | None, candidate_ns: int, now_ns: int,
               pending: PendingJump | None, stepout_ns: int = DEFAULT_STEPOUT_NS,
               allow_panic: bool = False, step_threshold_ns: int = STEP_THRESHOLD_NS,
               panic_threshold_ns: int = PANIC_THRESHOLD_NS,
               uncertainty_ns: int = 0) -> JumpDecision:
    """Whether to follow a newly selected offset (pure).

    ``tracked_ns`` is the offset served now (None before the first selection).
    Within ``step_threshold_ns`` of it: follow. Beyond: follow once the majority
    has kept reporting the jump (each report within the step threshold of the last)
    for ``stepout_ns``. An offset that may be ``panic_threshold_ns`` or more (given
    its ``uncertainty_ns``, the root distance) is never followed unless ``allow_panic``.
    """
    if abs(candidate_ns) + uncertainty_ns >= panic_threshold_ns and not allow_panic:
        since = pending.since_ns if pending is not None and \
            abs(candidate_ns - pending.offset_ns) <= step_threshold_ns else now_ns
        return JumpDecision(False, PendingJump(candidate_ns, since),
                            f"upstreams say {seconds_text(candidate_ns)}, beyond the panic "
                            f"threshold {seconds_text(panic_threshold_ns)[1:]}; not followed "
                            "without clock.allow_panic = true")
    if tracked_ns is None or abs(candidate_ns - tracked_ns) <= step_threshold_ns:
        return JumpDecision(True, None)
    if pending is None or abs(candidate_ns - pending.offset_ns) > step_threshold_ns:
        pending = PendingJump(candidate_ns, now_ns)
    else:
        pending = PendingJump(candidate_ns, pending.since_ns)
    waited_ns = now_ns - pending.since_ns
    if waited_ns >= stepout_ns:
        return JumpDecision(True, None, f"followed a jump of "
                            f"{seconds_text(candidate_ns - tracked_ns)} confirmed for "
                            f"{waited_ns // NS_PER_S} s")
    return JumpDecision(False, pending,
                        f"upstreams jumped {seconds_text(candidate_ns - tracked_ns)}; serving "
                        f"the tracked time until confirmed for {stepout_ns // NS_PER_S} s "
                        f"({waited_ns // NS_PER_S} s so far)")


def step_decision(offset_ns: int, confirmed_ns: int, survivors: int, allow_step: bool,
                  privileged: bool, stepout_ns: int = DEFAULT_STEPOUT_NS,
                  allow_panic: bool = False,
                  threshold_ns: int = SYSTEM_STEP_THRESHOLD_NS,
                  panic_threshold_ns: int = PANIC_THRESHOLD_NS) -> tuple[bool, str]:
    """Whether to step the system clock by ``offset_ns`` (pure); (yes, why).

    Never on one source's word: at least two sources must agree, and they must
    have agreed on this offset for ``confirmed_ns >= stepout_ns``.
    """
    if not allow_step:
        return False, "clock.allow_step is off"
    if abs(offset_ns) <= threshold_ns:
        return False, f"offset within {threshold_ns // NS_PER_S} s: served, not stepped"
    if survivors < 2:
        return False, "only one source vouches for the offset"
    if confirmed_ns < stepout_ns:
        return False, (f"offset confirmed for {confirmed_ns // NS_PER_S} s of the "
                       f"{stepout_ns // NS_PER_S} s stepout")
    if abs(offset_ns) >= panic_threshold_ns and not allow_panic:
        return False, "offset beyond the panic threshold"
    if not privileged:
        return False, "stepping the clock needs root"
    return True, f"step by {seconds_text(offset_ns)}"


# ----------------------------------------------------------------------- leap days

def is_leap_day(unix_ns: int) -> bool:
    """Leap seconds come at the end of June 30 or December 31 (UTC), as chrony accepts
    them; an announcement on any other day is not acted on."""
    _, month, day = _utc_date(unix_ns)
    return (month, day) in ((6, 30), (12, 31))


def _utc_date(unix_ns: int) -> tuple[int, int, int]:
    date = _UNIX_EPOCH_DATE + datetime.timedelta(days=unix_ns // NS_PER_S // 86_400)
    return date.year, date.month, date.day


_UNIX_EPOCH_DATE = datetime.date(1970, 1, 1)


def end_of_day_ns(unix_ns: int) -> int:
    return (unix_ns // NS_PER_S // 86_400 + 1) * 86_400 * NS_PER_S


# --------------------------------------------------------------------- the keeper

@dataclass(frozen=True, slots=True)
class KeeperSettings:
    max_distance_ns: int = DEFAULT_MAX_DISTANCE_NS
    stepout_ns: int = DEFAULT_STEPOUT_NS
    allow_panic: bool = False
    #: Holdover: with every source lost, serve on for this long, then go unsynchronised.
    lost_after_ns: int = 1024 * NS_PER_S
    #: A source with no sample for this long is no longer a candidate.
    unreachable_after_ns: int = 1024 * NS_PER_S
    step_threshold_ns: int = STEP_THRESHOLD_NS
    panic_threshold_ns: int = PANIC_THRESHOLD_NS
    max_frequency: float = MAX_FREQUENCY


class TimeKeeper:
    """Filters per source, selection, frequency, jump guard, holdover and leap (pure:
    every method takes ``now_ns``; nothing reads a clock).

    The served offset is ``offset_at(now)``: the last followed combined offset plus
    the frequency estimate times the time since, plus a leap second once due.
    """

    def __init__(self, settings: KeeperSettings | None = None) -> None:
        self.settings = settings or KeeperSettings()
        self.filters: dict[str, ClockFilter] = {}
        self.unusable: dict[str, str] = {}
        #: Per-source overrides of ``settings.unreachable_after_ns`` (a source polled
        #: less often, after a RATE KoD, is given as many of its own polls).
        self.unreachable_after_ns: dict[str, int] = {}
        self.frequency = 0.0
        self.last_selection = Selection(())
        self.pending: PendingJump | None = None
        self.note = ""
        # The last followed update: local time, offset, and the system peer's quality.
        self._ref_ns: int | None = None
        self._ref_offset_ns = 0
        self._ref_root_delay_ns = 0
        self._ref_root_dispersion_ns = 0
        self._stratum = STRATUM_UNSPECIFIED
        self._peer = ""
        self._survivors = 0
        self._confirmed_since_ns: int | None = None
        self._leap = Leap.NONE
        #: Served time at which the announced leap second is due (None: none due).
        self._leap_at_ns: int | None = None
        #: The last leap second applied: the announcement outlives it by a while.
        self._leap_done_ns: int | None = None

    # -- sources

    def add_source(self, source: str) -> None:
        self.filters.setdefault(source, ClockFilter())
        self.unusable.pop(source, None)

    def remove_source(self, source: str, reason: str = "") -> None:
        """Forget a source's samples; with a reason it stays in the report as unusable."""
        self.filters.pop(source, None)
        self.unreachable_after_ns.pop(source, None)
        if reason:
            self.unusable[source] = reason
        else:
            self.unusable.pop(source, None)

    def add_sample(self, source: str, sample: FilterSample) -> bool:
        """Feed one exchange; False when it was dropped (too close to a leap second)."""
        if self._leap_at_ns is not None and \
                abs(sample.taken_ns + sample.offset_ns - self._leap_at_ns) < LEAP_GUARD_NS:
            return False
        self.filters.setdefault(source, ClockFilter()).add(sample)
        self.unusable.pop(source, None)
        return True

    def clock_stepped(self, step_ns: int) -> None:
        """The local clock moved by ``step_ns`` (we stepped it, or the kernel inserted a
        leap second): keep the served time and every sample continuous. A leap second
        due is on the served time scale, which does not move."""
        for f in self.filters.values():
            f.shift(step_ns)
        self._ref_offset_ns -= step_ns
        if self._ref_ns is not None:
            self._ref_ns += step_ns
        if self.pending is not None:
            self.pending = PendingJump(self.pending.offset_ns - step_ns,
                                       self.pending.since_ns + step_ns)
        if self._confirmed_since_ns is not None:
            self._confirmed_since_ns += step_ns

    # -- served time

    def _base_offset_at(self, now_ns: int) -> int:
        if self._ref_ns is None:
            return 0
        return self._ref_offset_ns + round(self.frequency * (now_ns - self._ref_ns))

    def _leap_correction(self, now_ns: int) -> int:
        """-1 s once an inserted leap second is due (+1 s for a deleted one)."""
        if self._leap_at_ns is None or self._leap is Leap.NONE:
            return 0
        served = now_ns + self._base_offset_at(now_ns)
        if self._leap is Leap.INSERT_SECOND and served >= self._leap_at_ns:
            return -NS_PER_S
        if self._leap is Leap.DELETE_SECOND and served >= self._leap_at_ns - NS_PER_S:
            return NS_PER_S
        return 0

    def offset_at(self, now_ns: int) -> int:
        """The correction to add to the local clock at ``now_ns``."""
        return self._base_offset_at(now_ns) + self._leap_correction(now_ns)

    def leap_at(self, now_ns: int) -> Leap:
        """The leap indicator to serve: the majority's, on the day it is due, until then."""
        if self._leap_at_ns is None or self._leap_correction(now_ns):
            return Leap.NONE
        return self._leap

    def _commit_leap(self, now_ns: int) -> None:
        """Once a leap second has passed, fold it into the offset and the samples."""
        if self._leap_at_ns is None or not self._leap_correction(now_ns):
            return
        step = self._leap_correction(now_ns)
        local_instant = self._leap_at_ns - self._base_offset_at(self._leap_at_ns)
        for f in self.filters.values():
            f.shift_before(local_instant, step)
        self._ref_offset_ns += step
        if self.pending is not None:
            self.pending = None
        self._leap_done_ns = self._leap_at_ns
        self._leap_at_ns = None
        self._leap = Leap.NONE
        self.note = f"applied the leap second ({'inserted' if step < 0 else 'deleted'})"

    # -- the round

    def update(self, now_ns: int) -> Selection:
        """Select, estimate the frequency, guard against jumps; after each poll round."""
        self._commit_leap(now_ns)
        settings = self.settings
        estimates: list[SourceEstimate] = []
        unusable = sorted(self.unusable.items())
        rates: dict[str, float] = {}
        for name, f in sorted(self.filters.items()):
            newest = f.newest_ns
            if newest is None:
                unusable.append((name, "no reply yet"))
                continue
            if now_ns - newest > self.unreachable_after_ns.get(name,
                                                               settings.unreachable_after_ns):
                unusable.append((name, f"no reply for {(now_ns - newest) // NS_PER_S} s"))
                continue
            estimate = f.estimate(name, now_ns, self.frequency)
            if estimate is not None:
                estimates.append(estimate)
            fit = f.frequency()
            if fit is not None and fit[1] <= MAX_FREQUENCY_ERROR:
                rates[name] = fit[0]
        selection = select(estimates, settings.max_distance_ns, unusable,
                           drifting_sources(rates))
        self.last_selection = selection
        if selection.offset_ns is None or selection.system_peer is None:
            self.note = selection.failure
            self._confirmed_since_ns = None
            return selection
        self._update_frequency(selection.survivors)
        tracked = None if self._ref_ns is None else self.offset_at(now_ns)
        if self._survivors < 2 <= len(selection.survivors):
            # What we track rests on one source's word (the first to answer at start-up,
            # or the last left): a majority of more overrides it without a stepout.
            tracked = None
        jump_since = self.pending.since_ns if self.pending is not None else now_ns
        decision = guard_jump(tracked, selection.offset_ns, now_ns, self.pending,
                              settings.stepout_ns, settings.allow_panic,
                              settings.step_threshold_ns, settings.panic_threshold_ns,
                              selection.system_peer.root_distance_ns)
        self.pending = decision.pending
        self.note = decision.note
        if not decision.follow:
            return selection
        if tracked is not None and abs(selection.offset_ns - tracked) > settings.step_threshold_ns:
            self._confirmed_since_ns = jump_since  # the majority has agreed on it since then
        elif self._confirmed_since_ns is None:
            self._confirmed_since_ns = now_ns
        peer = selection.system_peer
        self._ref_ns = now_ns
        self._ref_offset_ns = selection.offset_ns
        self._ref_root_delay_ns = peer.root_delay_ns + peer.delay_ns
        self._ref_root_dispersion_ns = (peer.root_dispersion_ns + peer.dispersion_ns
                                        + math.isqrt(peer.jitter_ns ** 2
                                                     + selection.jitter_ns ** 2))
        self._stratum = min(peer.stratum + 1, STRATUM_UNSPECIFIED)
        self._peer = peer.source
        self._survivors = len(selection.survivors)
        self._schedule_leap(now_ns, selection.leap)
        return selection

    def _update_frequency(self, survivors: Sequence[SourceEstimate]) -> None:
        slopes = []
        for s in survivors:
            fit = self.filters[s.source].frequency()
            if fit is not None and fit[1] <= MAX_FREQUENCY_ERROR:
                slopes.append(fit[0])
        if not slopes:
            return
        limit = self.settings.max_frequency
        self.frequency = min(max(median(slopes), -limit), limit)

    def _schedule_leap(self, now_ns: int, leap: Leap) -> None:
        served = now_ns + self._base_offset_at(now_ns)
        due_ns = end_of_day_ns(served)
        if leap in (Leap.INSERT_SECOND, Leap.DELETE_SECOND) and is_leap_day(served) \
                and due_ns != self._leap_done_ns:
            self._leap = leap
            self._leap_at_ns = due_ns
        else:  # not announced by a majority (any more): nothing is due
            self._leap, self._leap_at_ns = Leap.NONE, None

    # -- what to serve

    def confirmed_for_ns(self, now_ns: int) -> int:
        """How long the majority has agreed with the offset served."""
        if self._confirmed_since_ns is None or self.pending is not None:
            return 0
        return now_ns - self._confirmed_since_ns

    def step_advice(self, now_ns: int, allow_step: bool, privileged: bool) -> tuple[bool, str]:
        """Whether to step the system clock now, and why (see :func:`step_decision`)."""
        return step_decision(self.offset_at(now_ns), self.confirmed_for_ns(now_ns),
                             self._survivors, allow_step, privileged, self.settings.stepout_ns,
                             self.settings.allow_panic)

    def clock_state(self, now_ns: int, precision: int, refid: bytes) -> ClockState:
        """The served state at ``now_ns`` (``refid`` is the system peer's, from the edge)."""
        if self._ref_ns is None:
            return unsynchronized("upstream", self.note or "no upstream has answered yet",
                                  precision)
        if self.last_selection.disagreement:
            return unsynchronized("upstream", self.last_selection.failure, precision)
        age_ns = now_ns - self._ref_ns
        if age_ns > self.settings.lost_after_ns:
            return unsynchronized("upstream", f"upstreams lost: no selection for "
                                  f"{age_ns // NS_PER_S} s" + (f" ({self.note})"
                                                              if self.note else ""), precision)
        offset_ns = self.offset_at(now_ns)
        if self.last_selection.offset_ns is None:
            detail = f"holdover since {age_ns // NS_PER_S} s: {self.note}"
        elif self.pending is not None:
            detail = self.note
        else:
            detail = (f"{self._survivors} of {len(self.last_selection.reports)} upstreams "
                      f"selected, system peer {self._peer}")
        # The reference timestamp goes on the wire, so it is on the served time scale;
        # ClockState grows dispersion from it against the system clock, which falls
        # short by PHI times a positive offset: added here (a negative one errs safe).
        reference_ns = self._ref_ns + self._ref_offset_ns
        return ClockState(
            synchronized=self._stratum < STRATUM_UNSPECIFIED, stratum=self._stratum,
            refid=refid, precision=precision, root_delay_ns=self._ref_root_delay_ns,
            root_dispersion_ns=min(MAX_DISPERSION_NS, self._ref_root_dispersion_ns
                                   + phi_ns(self._ref_offset_ns)),
            reference_unix_ns=reference_ns, leap=self.leap_at(now_ns),
            offset_ns=offset_ns, source="upstream", detail=detail)

    @property
    def system_peer(self) -> str:
        return self._peer

    def report(self) -> list[dict[str, object]]:
        """The last selection, one plain dict per source (for ``stats`` and logs)."""
        return [r.as_dict() for r in self.last_selection.reports]

