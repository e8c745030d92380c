"""``--clock system``: serve the kernel clock that chronyd or ntpd disciplines.

This is how a pool server is usually run: a full NTP daemon keeps the clock
right, guardntp only answers the public. When a local chronyd answers ``chronyc
-c tracking``, the clock is served as chronyd itself would serve it: its
stratum, refid, root delay and dispersion and leap status, and LI=3 when
either chronyd or the kernel calls the clock unsynchronised. Without chronyd,
sync status, leap flags and error estimate come from the kernel (``adjtimex``)
and stratum and refid from configuration.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..client import root_distance_problem
from ..clock import ClockState, unsynchronized
from ..timestamps import NS_PER_S
from ..wire import STRATUM_UNSPECIFIED, Leap
from . import SyncWatch
from .kernel import KernelClock, read_kernel_clock

log = logging.getLogger("guardntp.clock")

#: How often to ask the kernel and chronyc again (the server calls state() often).
KERNEL_REFRESH_NS = NS_PER_S // 4
CHRONYC_REFRESH_NS = 16 * NS_PER_S


@dataclass(frozen=True, slots=True)
class Tracking:
    """The fields of ``chronyc -c tracking`` that a server needs."""

    refid: bytes
    stratum: int
    reference_unix_ns: int
    root_delay_ns: int
    root_dispersion_ns: int
    leap: Leap
    synchronized: bool


_CHRONY_LEAP = {"Normal": Leap.NONE, "Insert second": Leap.INSERT_SECOND,
                "Delete second": Leap.DELETE_SECOND, "Not synchronised": Leap.UNSYNCHRONIZED}


def parse_chronyc_tracking(csv_line: str) -> Tracking:
    """Parse one line of ``chronyc -c tracking``. Raises ``ValueError`` on anything odd."""
    fields = csv_line.strip().split(",")
    if len(fields) < 14:
        raise ValueError(f"chronyc tracking: expected 14 fields, got {len(fields)}")
    refid = bytes.fromhex(fields[0].rjust(8, "0"))
    stratum = int(fields[2])
    ref_seconds = fields[3]
    whole, _, frac = ref_seconds.partition(".")
    reference_unix_ns = int(whole) * NS_PER_S + int((frac + "000000000")[:9])
    leap = _CHRONY_LEAP.get(fields[13], Leap.UNSYNCHRONIZED)
    return Tracking(
        refid=refid, stratum=stratum, reference_unix_ns=reference_unix_ns,
        root_delay_ns=_seconds_to_ns(fields[10]), root_dispersion_ns=_seconds_to_ns(fields[11]),
        leap=leap,
        synchronized=leap is not Leap.UNSYNCHRONIZED and 0 < stratum < STRATUM_UNSPECIFIED,
    )


def _seconds_to_ns(text: str) -> int:
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("+-").partition(".")
    ns = int(whole or "0") * NS_PER_S + int((frac + "000000000")[:9])
    return -ns if negative else ns


def clock_state_from(kernel: KernelClock, tracking: Tracking | None, stratum: int,
                     refid: bytes, precision: int, now_ns: int) -> ClockState:
    """Combine the kernel's view and chronyd's (pure: tested with fakes).

    Both must call the clock synchronised. When chronyd answers, its word wins
    for everything else: it serves the same clock, so guardntp serves chronyd's
    own stratum, refid, root delay and dispersion (another interface of the same
    server, not one more hop), and chronyd's leap status, which its ``leapsecmode
    slew`` and ``step`` never write into the kernel's STA_INS/STA_DEL bits.
    """
    if not kernel.synchronized:
        return unsynchronized("system", "kernel reports the clock unsynchronised", precision)
    if tracking is not None:
        if not tracking.synchronized:
            said = ("Not synchronised" if tracking.leap is Leap.UNSYNCHRONIZED
                    else f"stratum {tracking.stratum}")
            return unsynchronized("system", f"chronyd reports {said}", precision)
        problem = root_distance_problem(tracking.root_delay_ns, tracking.root_dispersion_ns)
        if problem is not None:
            return unsynchronized("system", f"chronyd's {problem}", precision)
        return ClockState(
            synchronized=True, stratum=tracking.stratum, refid=tracking.refid,
            precision=precision, root_delay_ns=tracking.root_delay_ns,
            root_dispersion_ns=tracking.root_dispersion_ns,
            reference_unix_ns=tracking.reference_unix_ns, leap=tracking.leap, source="system",
            detail="kernel clock disciplined by chronyd")
    # No chronyd to ask: the kernel's estimated error stands in for root
    # dispersion, and the reference time is "now" since ntpd keeps maxerror fresh.
    problem = root_distance_problem(0, kernel.maxerror_us * 1000)
    if problem is not None:
        return unsynchronized("system", f"kernel maxerror: {problem}", precision)
    leap = (Leap.INSERT_SECOND if kernel.leap_insert
            else Leap.DELETE_SECOND if kernel.leap_delete else Leap.NONE)
    return ClockState(
        synchronized=True, stratum=stratum, refid=refid, precision=precision,
        root_delay_ns=0, root_dispersion_ns=kernel.maxerror_us * 1000,
        reference_unix_ns=now_ns, leap=leap, source="system",
        detail="kernel clock (stratum and refid from configuration)")


def read_state(read_kernel: Callable[[], KernelClock], tracking: Tracking | None, stratum: int,
               refid: bytes, precision: int, now_ns: int) -> ClockState:
    """One reading: the kernel's view (an adjtimex failure means unsynchronised) and chronyd's."""
    try:
        kernel = read_kernel()
    except OSError as error:
        return unsynchronized("system", f"adjtimex: {error}", precision)
    return clock_state_from(kernel, tracking, stratum, refid, precision, now_ns)


class SystemClock:
    """The kernel clock, read at most every 0.25 s, with chronyc's view every 16 s.

    ``read_kernel`` and ``read_tracking`` stand in for adjtimex and chronyc
    (tests pass fakes); without ``read_tracking`` chronyc is run when found.
    """

    name = "system"

    def __init__(self, stratum: int = 2, refid: bytes = b"\0\0\0\0", precision: int = -20,
                 use_chronyc: bool = True, chronyc_socket: str = "",
                 read_kernel: Callable[[], KernelClock] = read_kernel_clock,
                 read_tracking: Callable[[], Tracking | None] | None = None) -> None:
        self.stratum = stratum
        self.refid = refid
        self.precision = precision
        self.chronyc = shutil.which("chronyc") if use_chronyc and read_tracking is None \
            else None
        # chronyc's -h: a Unix socket path or host of chronyd's command port.
        self.chronyc_host = ["-h", chronyc_socket] if chronyc_socket else []
        self.read_kernel = read_kernel
        self.read_tracking = read_tracking if read_tracking is not None else self._chronyc_tracking
        self.watch = SyncWatch(log)
        self._tracking: Tracking | None = None
        self._tracking_at = -CHRONYC_REFRESH_NS
        self._state: ClockState | None = None
        self._state_at = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _chronyc_tracking(self) -> Tracking | None:
        if self.chronyc is None:
            return None
        try:
            result = subprocess.run([self.chronyc, *self.chronyc_host, "-c", "-n", "tracking"],
                                    capture_output=True,
                                    text=True, timeout=2, check=False)
            return parse_chronyc_tracking(result.stdout) if result.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired) as error:
            log.debug("chronyc tracking unavailable: %s", error)
            return None

    def _refresh_tracking(self, now_ns: int) -> None:
        self._tracking_at = now_ns
        self._tracking = self.read_tracking()

    def state(self, now_ns: int) -> ClockState:
        if self._state is not None and now_ns - self._state_at < KERNEL_REFRESH_NS:
            return self._state
        if now_ns - self._tracking_at >= CHRONYC_REFRESH_NS:
            self._refresh_tracking(now_ns)
        self._state = read_state(self.read_kernel, self._tracking, self.stratum, self.refid,
                                 self.precision, now_ns)
        self._state_at = now_ns
        self.watch.observe(self._state)
        return self._state
