"""What the server knows about its own time, as an immutable snapshot.

Rule: a :class:`ClockState` is produced by a time source (``guardntp/timesources``)
at the edge and consumed by pure code. Pure code never reads a clock: it takes
``now_ns`` as an argument and asks the snapshot what to put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from .timestamps import NS_PER_S, ns_to_short, unix_ns_to_ntp
from .wire import STRATUM_UNSPECIFIED, Leap

#: RFC 5905 §7.2 PHI: dispersion grows 15 ppm of the time since the last update.
DISPERSION_RATE_PPM = 15
#: Root dispersion saturates at RFC 5905 MAXDISP (16 s).
MAX_DISPERSION_NS = 16 * NS_PER_S


@dataclass(frozen=True, slots=True)
class ClockState:
    """One reading of the served clock's quality.

    ``offset_ns`` is added to the system clock to get the time served (nonzero
    only for the ``upstream`` source, which never steps the clock by default).
    """

    synchronized: bool
    stratum: int
    refid: bytes
    precision: int
    root_delay_ns: int
    root_dispersion_ns: int
    reference_unix_ns: int
    leap: Leap = Leap.NONE
    offset_ns: int = 0
    source: str = "local"
    detail: str = ""

    @property
    def wire_leap(self) -> Leap:
        """RFC 5905 §7.3: LI=3 whenever the server is not synchronised."""
        return self.leap if self.synchronized else Leap.UNSYNCHRONIZED

    @property
    def wire_stratum(self) -> int:
        """Stratum 16 internally is sent as 0 (RFC 5905 §7.3 customary mapping)."""
        if not self.synchronized or self.stratum >= STRATUM_UNSPECIFIED:
            return 0
        return self.stratum

    def root_dispersion_at(self, now_ns: int) -> int:
        """Root dispersion in ns, grown by 15 ppm of the age of the last update."""
        age_ns = max(0, now_ns - self.reference_unix_ns)
        grown = self.root_dispersion_ns + age_ns * DISPERSION_RATE_PPM // 1_000_000
        return min(grown, MAX_DISPERSION_NS)

    def reply_fields(self, now_ns: int) -> bytes:
        """Bytes 4-23 of a reply (root delay, root dispersion, refid, reference ts)."""
        reference_ts = unix_ns_to_ntp(self.reference_unix_ns) if self.reference_unix_ns else 0
        return (
            ns_to_short(self.root_delay_ns).to_bytes(4, "big")
            + ns_to_short(self.root_dispersion_at(now_ns)).to_bytes(4, "big")
            + (self.refid if self.synchronized else b"\0\0\0\0")[:4].ljust(4, b"\0")
            + reference_ts.to_bytes(8, "big")
        )


def unsynchronized(source: str, detail: str, precision: int = -20) -> ClockState:
    """The state served when a source has nothing trustworthy to say."""
    return ClockState(
        synchronized=False, stratum=STRATUM_UNSPECIFIED, refid=b"\0\0\0\0",
        precision=precision, root_delay_ns=0, root_dispersion_ns=MAX_DISPERSION_NS,
        reference_unix_ns=0, source=source, detail=detail,
    )
