"""Every packet ends in exactly one counted verdict, with one reason.

Rule: adding a way for a packet to end means adding a :class:`Reason` here; the
server counts by (NTP version, reason) and the verdict follows from the reason.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, MutableMapping, MutableSequence

try:
    from ._fastlane import Counts as _Counts
except ImportError:  # no C compiler at install: a list
    _Counts = None  # type: ignore[assignment, misc]


class Verdict(enum.Enum):
    TIME = "time"      # a normal server reply carrying time
    KOD = "kod"        # a Kiss-o'-Death reply carrying no time
    DROP = "drop"      # nothing sent


class Reason(enum.IntEnum):
    # -- time replies
    ANSWERED = 0
    LEAKED = 1               # over the limit, answered anyway by the random leak
    # -- Kiss-o'-Death replies
    RATE_KOD = 2
    DENY_KOD = 3
    # -- drops: not an NTP request we answer
    MALFORMED = 4            # length, alignment, version or tail rules
    NOT_A_REQUEST = 5        # modes 2, 4, 5 (responses and broadcasts): never answered
    CONTROL_MODE = 6         # mode 6: no control queries for the public
    PRIVATE_MODE = 7         # mode 7 (monlist, CVE-2013-5211): never implemented
    RESERVED_MODE = 8        # mode 0 other than NTPv1 from a port other than 123
    SYMMETRIC_DISABLED = 9   # mode 1 when symmetric answers are turned off
    # -- drops: policy
    REFLECTION_PORT = 10     # source port 0 or a well-known service port
    ACL_DENY = 11
    BLOCKLISTED = 12
    RATE_LIMITED = 13        # over the bucket, no KoD due (KoD guard or budget)
    GLOBAL_CAP = 14          # the server-wide reply budget is spent
    AUTH_FAILED = 15         # bad MAC, or unknown key
    AUTH_REQUIRED = 16       # unauthenticated request where policy requires a MAC
    CRYPTO_NAK = 17          # a crypto-NAK tail in a request
    # -- NTS (RFC 8915)
    NTS_NAK = 18             # a cookie that does not open: Kiss-o'-Death NTSN
    NTS_REJECTED = 19        # malformed NTS fields, or an authenticator that fails


VERDICT_OF: dict[Reason, Verdict] = {
    reason: (
        Verdict.TIME if reason in (Reason.ANSWERED, Reason.LEAKED)
        else Verdict.KOD if reason in (Reason.RATE_KOD, Reason.DENY_KOD, Reason.NTS_NAK)
        else Verdict.DROP
    )
    for reason in Reason
}

N_REASONS = len(Reason)
N_VERSIONS = 8  # the version field is 3 bits; index by it directly


def new_counts(size: int) -> MutableSequence[int]:
    """``size`` counts of 0: where the extension is built a ``_fastlane.Counts``, which
    the compiled core adds to in place (a list's ways of reading and writing a cell),
    else a list."""
    return [0] * size if _Counts is None else _Counts(size)


class Counters:
    """Packet counts by (version, reason) in one flat list: one index and one add per packet."""

    __slots__ = ("counts", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.counts = new_counts(N_VERSIONS * N_REASONS)
        self.bytes_in = 0
        self.bytes_out = 0

    def add(self, version: int, reason: Reason, n: int = 1) -> None:
        self.counts[(version & 7) * N_REASONS + reason] += n

    def by_reason(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for index, count in enumerate(self.counts):
            if count:
                name = Reason(index % N_REASONS).name.lower()
                totals[name] = totals.get(name, 0) + count
        return totals

    def by_verdict(self) -> dict[str, int]:
        totals = {verdict.value: 0 for verdict in Verdict}
        for index, count in enumerate(self.counts):
            totals[VERDICT_OF[Reason(index % N_REASONS)].value] += count
        return totals

    def by_version(self) -> dict[int, dict[str, int]]:
        table: dict[int, dict[str, int]] = {}
        for index, count in enumerate(self.counts):
            if count:
                version, reason = divmod(index, N_REASONS)
                table.setdefault(version, {})[Reason(reason).name.lower()] = count
        return table

    def total(self) -> int:
        return sum(self.counts)


class LabelCounts(MutableMapping[str, int]):
    """Packet counts by label (``filter/fingerprint.py``): a mapping of a fixed set of
    labels over one ``counts`` sequence (a ``_fastlane.Counts`` where the extension is
    built, which the compiled core adds to in place). Labels cannot be added or
    removed: an unknown label is a KeyError."""

    __slots__ = ("labels", "counts", "_cell")

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = tuple(dict.fromkeys(labels))
        self._cell = {label: cell for cell, label in enumerate(self.labels)}
        self.counts = new_counts(len(self.labels))

    def __getitem__(self, label: str) -> int:
        return self.counts[self._cell[label]]

    def __setitem__(self, label: str, count: int) -> None:
        self.counts[self._cell[label]] = count

    def __delitem__(self, label: str) -> None:
        raise TypeError("a label's count cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"LabelCounts({dict(self)!r})"
