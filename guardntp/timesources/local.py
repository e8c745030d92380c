"""``--clock local``: serve this machine's clock as if it were a reference.

For labs, demos and offline networks only. The clock is not synchronised to
anything, so the server says so loudly in its log when it starts.
"""

from __future__ import annotations

import logging

from ..clock import ClockState

log = logging.getLogger("guardntp.clock")

#: chrony's ``local`` directive uses refid 127.127.1.1 ("LOCL" in ntpd's driver 1).
LOCAL_REFID = bytes((127, 127, 1, 1))
#: chrony and ntpd both default to stratum 10 for an undisciplined local clock.
DEFAULT_LOCAL_STRATUM = 10


class LocalClock:
    name = "local"

    def __init__(self, stratum: int = DEFAULT_LOCAL_STRATUM, precision: int = -20) -> None:
        if not 1 <= stratum <= 15:
            raise ValueError(f"local clock stratum must be 1-15, not {stratum}")
        self.stratum = stratum
        self.precision = precision

    def start(self) -> None:
        log.warning(
            "serving the LOCAL clock at stratum %d: it is NOT synchronised to any reference; "
            "use --clock system or --clock upstream on a public server", self.stratum)

    def stop(self) -> None:
        pass

    def state(self, now_ns: int) -> ClockState:
        # Like chrony's `local`, the reference time follows the clock itself.
        return ClockState(
            synchronized=True, stratum=self.stratum, refid=LOCAL_REFID,
            precision=self.precision, root_delay_ns=0, root_dispersion_ns=0,
            reference_unix_ns=now_ns, source=self.name, detail="local clock, no reference",
        )
