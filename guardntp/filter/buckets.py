"""Token buckets as GCRA, and bounded tables of them that survive spoofed churn.

A token bucket of rate r and burst b is kept as one integer per key, its
*theoretical arrival time* (TAT, the Generic Cell Rate Algorithm of ITU-T I.371).
A request at ``now`` conforms when ``TAT - now <= tolerance`` where
``tolerance = (burst - 1) * interval``; conforming moves TAT to
``max(TAT, now) + interval``. This is the same bucket as "tokens and last
time" but in one int, with no division on the hot path, and it makes
"the bucket is full" a single comparison: ``TAT <= now``.

Tables are bounded. The churn rule (what chronyd 4.3 lacks): an entry is
evicted only when its bucket is full again, i.e. when forgetting it loses
nothing, since a newcomer would start with a full bucket anyway. An offender
that keeps its bucket drained is never displaced by spoofed one-packet
sources, however many arrive.

Once that table is full, a source enters it only on its *second* request: a
first request is remembered in a :class:`NewcomerTable`, just the TAT, in a
large FIFO ring at ~90 bytes an entry (compiled; ~130 in Python). Spoofed
one-packet sources therefore churn only the newcomer ring, never the established table, so returning
legitimate clients always find room. An offender is promoted at its second request as
long as the ring outlives its polling interval (524,288 entries at 200,000
new sources a second: 2.6 s). When the established table is full of draining
offenders, a source stays a newcomer, still limited by its own remembered
bucket, never waved through.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass
from typing import Any

from ..timestamps import NS_PER_S

try:
    from .._fastlane import AddressTable, NewcomerRing
except ImportError:  # no C compiler at install: OrderedDict and PyNewcomerRing serve
    AddressTable = None  # type: ignore[assignment, misc]
    NewcomerRing = None  # type: ignore[assignment, misc]
else:
    MutableMapping.register(AddressTable)


#: The fastest rate a bucket can hold: one request per nanosecond, the unit TATs count in.
MAX_RATE = float(NS_PER_S)
#: The longest a bucket may take to refill from empty (burst / rate): ten years, far
#: past any useful setting, so a TAT stays well inside 64 bits (the compiled loop
#: keeps them as int64) however long the server runs.
MAX_REFILL_NS = 10 * 365 * 86_400 * NS_PER_S


def is_finite_number(value: object) -> bool:
    """An int or a float that is neither nan nor infinite (TOML has both); never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def is_whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BadLimit(ValueError):
    """A rate or burst no bucket can have; ``part`` says which ("rate" or "burst")."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part} {message}")
        self.part = part
        self.message = message


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate (requests per second, may be fractional) and a burst, as GCRA integers."""

    interval_ns: int
    tolerance_ns: int

    @classmethod
    def per_second(cls, rate: float, burst: int) -> Limit:
        """Raises :class:`BadLimit` unless 0 < rate <= MAX_RATE, burst >= 1 and the
        bucket refills within MAX_REFILL_NS."""
        if not is_finite_number(rate) or not 0 < rate <= MAX_RATE:
            raise BadLimit("rate", f"must be a finite number > 0 and at most {MAX_RATE:.0f} "
                           "(requests per second)")
        if not is_whole_number(burst) or burst < 1:
            raise BadLimit("burst", "must be a whole number >= 1")
        interval_ns = max(1, round(NS_PER_S / rate))
        if burst * interval_ns > MAX_REFILL_NS:
            raise BadLimit("rate", f"{rate:g}/s with a burst of {burst} takes "
                           f"{burst * interval_ns / NS_PER_S:.3g} s to refill, more than "
                           f"{MAX_REFILL_NS // NS_PER_S} s (ten years)")
        return cls(interval_ns, (burst - 1) * interval_ns)

    @property
    def rate(self) -> float:
        return NS_PER_S / self.interval_ns

    @property
    def burst(self) -> int:
        return self.tolerance_ns // self.interval_ns + 1


#: How many entries one admission may look at for an evictable one. Bounded, so a
#: table full of offenders costs a newcomer at most this many dict operations.
EVICTION_SCAN = 8


class BucketTable:
    """A bounded map from key to a mutable record whose item 0 is the bucket's TAT.

    Insertion-ordered with second chance (CLOCK): the oldest entry is evicted if
    its bucket is full, else moved to the back. Entries are mutable sequences so
    the pipeline can keep counters beside the TAT without another lookup.

    ``records`` is the one map of them: where the compiled loop is built an
    :class:`~guardntp._fastlane.AddressTable` (an ordered map in C, with
    OrderedDict's methods), which the loop reads, inserts into and evicts from
    itself; else an OrderedDict. Read it freely; change its membership only
    through :meth:`insert`, :meth:`admit` and eviction.
    """

    __slots__ = ("records", "max_entries", "evictions", "admissions_refused", "tat_cells")

    def __init__(self, max_entries: int, tat_cells: tuple[int, ...] = (0,)) -> None:
        if max_entries < 1:
            raise ValueError("a table needs room for at least one entry")
        #: The items of a record that are TATs: an entry is evictable once all are <= now.
        self.tat_cells = tat_cells
        self.records: OrderedDict[bytes, MutableSequence[Any]] | AddressTable = (
            OrderedDict() if AddressTable is None else AddressTable())
        self.max_entries = max_entries
        self.evictions = 0
        self.admissions_refused = 0

    def __len__(self) -> int:
        return len(self.records)

    def insert(self, key: bytes, record: MutableSequence[Any]) -> None:
        """Put ``record`` under ``key`` whatever the size (the caller checked for room)."""
        self.records[key] = record

    def admit(self, key: bytes, record: MutableSequence[Any], now_ns: int) -> bool:
        """Insert ``record`` under ``key`` if there is room or an evictable entry."""
        if len(self.records) >= self.max_entries and not self._evict_one(now_ns):
            self.admissions_refused += 1
            return False
        self.insert(key, record)
        return True

    def _evict_one(self, now_ns: int) -> bool:
        records = self.records
        for _ in range(min(EVICTION_SCAN, len(records))):
            oldest = next(iter(records))
            record = records[oldest]
            if all(record[cell] <= now_ns for cell in self.tat_cells if cell < len(record)):
                del records[oldest]
                self.evictions += 1
                return True
            records.move_to_end(oldest)
        return False


class PyNewcomerRing:
    """:class:`~guardntp._fastlane.NewcomerRing` in Python, where it is not compiled:
    a dict key -> TAT bounded by a ring of keys (the same rules, the same methods)."""

    __slots__ = ("tats", "_ring", "_next", "max_entries", "evictions")

    def __init__(self, max_entries: int) -> None:
        self.tats: dict[bytes, int] = {}
        self._ring: list[bytes | None] = [None] * max_entries
        self._next = 0
        self.max_entries = max_entries
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.tats)

    def __contains__(self, key: object) -> bool:
        return key in self.tats

    def __getitem__(self, key: bytes) -> int:
        return self.tats[key]

    def get(self, key: bytes, default: int | None = None) -> int | None:
        return self.tats.get(key, default)

    def discard(self, key: bytes) -> bool:
        return self.tats.pop(key, None) is not None

    def items(self) -> list[tuple[bytes, int]]:
        return list(self.tats.items())

    def remember(self, key: bytes, tat: int) -> None:
        tats = self.tats
        if key in tats:
            tats[key] = tat
            return
        slot = self._next
        old = self._ring[slot]
        if old is not None and tats.pop(old, None) is not None:
            self.evictions += 1
        self._ring[slot] = key
        tats[key] = tat
        self._next = slot + 1 if slot + 1 < self.max_entries else 0


class NewcomerTats(Mapping[bytes, int]):
    """A read-only view of a newcomer table's key -> TAT (stats, metrics, tests)."""

    __slots__ = ("_ring",)

    def __init__(self, ring: NewcomerRing | PyNewcomerRing) -> None:
        self._ring = ring

    def __getitem__(self, key: bytes) -> int:
        return self._ring[key]

    def __contains__(self, key: object) -> bool:
        return key in self._ring

    def __iter__(self) -> Iterator[bytes]:
        return iter([key for key, _ in self._ring.items()])

    def __len__(self) -> int:
        return len(self._ring)


class NewcomerTable:
    """First sightings: packed address -> TAT, forgotten first-in first-out.

    A ring of keys bounds the table: writing a slot forgets the key that was
    there (unless it was promoted meanwhile). A key re-added after promotion
    may be forgotten early, which only costs it its newcomer history.

    The entries live in ``ring``: where the compiled loop is built a
    :class:`~guardntp._fastlane.NewcomerRing` (keys of 1-16 bytes kept in C,
    ~90 bytes an entry), which the loop reads and writes itself; else a
    :class:`PyNewcomerRing`. ``tats`` is a read-only mapping view of them.
    """

    __slots__ = ("ring",)

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a table needs room for at least one entry")
        self.ring: NewcomerRing | PyNewcomerRing = (
            NewcomerRing(max_entries) if NewcomerRing is not None
            else PyNewcomerRing(max_entries))

    def __len__(self) -> int:
        return len(self.ring)

    @property
    def max_entries(self) -> int:
        return self.ring.max_entries

    @property
    def evictions(self) -> int:
        return self.ring.evictions

    @property
    def tats(self) -> NewcomerTats:
        return NewcomerTats(self.ring)

    def get(self, key: bytes) -> int | None:
        """The TAT remembered for ``key``, if any."""
        return self.ring.get(key)

    def forget(self, key: bytes) -> bool:
        """Drop ``key`` (promoted); its ring slot stays behind."""
        return self.ring.discard(key)

    def remember(self, key: bytes, tat: int) -> None:
        self.ring.remember(key, tat)

    def resized(self, max_entries: int) -> NewcomerTable:
        """This table at a new size (reload), keeping the most recent entries that fit.

        A new table (this one when the size is unchanged), so that the caller can
        swap it in whole once everything else of a new policy is ready."""
        if max_entries == self.max_entries:
            return self
        table = NewcomerTable(max_entries)
        for key, tat in self.ring.items()[-max_entries:]:
            table.remember(key, tat)
        table.ring.evictions = self.evictions
        return table
