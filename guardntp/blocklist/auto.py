"""Automatic blocking: sources that stay over their limit get a blocklist entry.

Rule: pure. The server's timer hands in the filter's per-source records and the
monotonic time; this module answers which sources to block. Writing the entry
is ``live.py``'s job.

Why block at all when the bucket already limits a source: a limited request
still costs a dict probe, a bucket check and a counter, and a KoD now and then.
An nftables export of the auto entries moves that cost into the kernel, and the
TTL lets a reformed (or re-assigned) address back in by itself.

"Over the limit" is measured by what the filter did, not by what the bucket
holds: a source is watched from the first scan that finds it recently active
with limited requests (drops or KoDs), and kept under watch for as long as its
limited count grows from one scan to the next. Once watched for ``after_s``
at an average of at least ``min_rate`` limited requests per second, it is due.
Sources named in the access list (allow, exempt, or already blocked) are never
auto-blocked.

Nor is a *contested* source, whose requests arrive in two TTL classes from the
same kind of sender (``filter/crowd.py``):
one of them may be a spoofer flooding in the name of the address's real owner,
and blocking the address would do the spoofer's work. Its buckets limit each
class on its own. A spoofer alone, in the name of an address idle for longer
than the class memory, looks like one host and can still get it blocked for
``auto_ttl``: that is why automatic blocking is off by default (docs/filter.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, MutableSequence
from dataclasses import dataclass
from typing import Any

from ..filter.reference import ACL_ENTRY, DROPS, KODS, LAST_SEEN, is_contested
from ..timestamps import NS_PER_S
from .entries import ACTIONS, BadDuration, Network, parse_duration

#: A source must have been seen this recently to start being watched.
RECENT_NS = 2 * NS_PER_S
#: Watching costs one small list per source; a flood of a million limited
#: sources must not make the watch list a memory problem of its own.
MAX_SUSPECTS = 65_536
#: Records looked at per timer tick, so a full table never stalls the packet loop.
SCAN_BUDGET = 8192


class BadAutoSettings(ValueError):
    """A ``[blocklist]`` setting that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class AutoPolicy:
    enabled: bool = False
    #: Seconds a source must stay over its limit before it is blocked.
    after_s: float = 60.0
    #: How long an automatic entry lasts.
    ttl_s: int = 3600
    #: Limited requests per second (averaged over ``after_s``) that count as a flood.
    #: A NAT'd crowd's bucket grows with its crowd estimate (filter/crowd.py); where the
    #: estimate falls short, 40 clients behind one NAT polling every 64 s exceed a
    #: one-client bucket (1/8 s) by only ~0.5/s and must not be cut off; a stuck
    #: device at 1/s exceeds it by 0.875/s, a flood by far more.
    min_rate: float = 0.75
    action: str = "drop"

    @property
    def after_ns(self) -> int:
        return int(self.after_s * NS_PER_S)

    @property
    def cycle_ns(self) -> int:
        """Least time between two looks at one source: a quarter of ``after``, 0.5-5 s."""
        return min(5 * NS_PER_S, max(NS_PER_S // 2, self.after_ns // 4))


_KEYS = ("auto", "auto_after", "auto_ttl", "auto_min_rate", "auto_action")


def parse_auto_policy(table: Mapping[str, Any]) -> AutoPolicy:
    """The ``[blocklist]`` section. Raises :class:`BadAutoSettings`."""
    for key in table:
        if key not in _KEYS:
            raise BadAutoSettings(f"blocklist.{key}: unknown setting (known: "
                                  + ", ".join(_KEYS) + ")")
    policy = AutoPolicy()
    enabled = table.get("auto", policy.enabled)
    if not isinstance(enabled, bool):
        raise BadAutoSettings("blocklist.auto: must be true or false")
    after = table.get("auto_after", policy.after_s)
    if isinstance(after, bool) or not isinstance(after, int | float) or after <= 0:
        raise BadAutoSettings("blocklist.auto_after: must be a number of seconds > 0")
    ttl = table.get("auto_ttl", policy.ttl_s)
    try:
        if isinstance(ttl, bool) or not isinstance(ttl, int | str):
            raise BadDuration("must be a duration such as \"1h\" or a number of seconds")
        ttl_s = parse_duration(str(ttl))
    except BadDuration as error:
        raise BadAutoSettings(f"blocklist.auto_ttl: {error}") from None
    min_rate = table.get("auto_min_rate", policy.min_rate)
    if isinstance(min_rate, bool) or not isinstance(min_rate, int | float) or min_rate < 0:
        raise BadAutoSettings("blocklist.auto_min_rate: must be a number >= 0")
    action = table.get("auto_action", policy.action)
    if action not in ACTIONS:
        raise BadAutoSettings("blocklist.auto_action: must be one of " + ", ".join(ACTIONS))
    return AutoPolicy(enabled, float(after), ttl_s, float(min_rate), str(action))


def network_of_key(key: bytes) -> Network:
    """A filter table key (4 bytes IPv4, or the leading bytes of an IPv6 address)."""
    if len(key) == 4:
        return ipaddress.IPv4Network((key, 32))
    return ipaddress.IPv6Network((key.ljust(16, b"\0"), len(key) * 8))


class AutoBlocker:
    """Watches sources across scans. ``scan`` looks at a bounded slice of the table."""

    def __init__(self, policy: AutoPolicy) -> None:
        self.policy = policy
        #: key -> [watched since ns, limited count then, limited count at the last look]
        self.suspects: dict[bytes, list[int]] = {}
        self._pending: list[bytes] = []
        self._cycle_started_ns: int | None = None

    def scan(self, records: Mapping[bytes, MutableSequence[Any]], now_ns: int,
             budget: int = SCAN_BUDGET) -> list[tuple[bytes, float]]:
        """Look at up to ``budget`` records; return (key, limited per second) now due."""
        if not self._pending:
            started = self._cycle_started_ns
            if started is not None and now_ns - started < self.policy.cycle_ns:
                return []
            self._cycle_started_ns = now_ns
            self._pending = list(records)
            self._forget_vanished(records)
        batch = self._pending[-budget:]
        del self._pending[-budget:]
        due = []
        for key in batch:
            record = records.get(key)
            if record is None:
                self.suspects.pop(key, None)
                continue
            rate = self._observe(key, record, now_ns)
            if rate is not None:
                due.append((key, rate))
        return due

    def _observe(self, key: bytes, record: MutableSequence[Any], now_ns: int) -> float | None:
        limited = record[DROPS] + record[KODS]
        suspect = self.suspects.get(key)
        if suspect is None:
            if (limited and now_ns - record[LAST_SEEN] < RECENT_NS
                    and record[ACL_ENTRY] is None and len(self.suspects) < MAX_SUSPECTS
                    and not is_contested(record, now_ns)):
                self.suspects[key] = [now_ns, limited, limited]
            return None
        since_ns, limited_then, last_limited = suspect
        if limited == last_limited or record[ACL_ENTRY] is not None or \
                is_contested(record, now_ns):
            # calmed down, now named in the access list, or perhaps spoofed
            del self.suspects[key]
            return None
        suspect[2] = limited
        watched_ns = now_ns - since_ns
        if watched_ns < self.policy.after_ns:
            return None
        rate = float((limited - limited_then) * NS_PER_S / watched_ns)
        if rate < self.policy.min_rate:
            return None
        del self.suspects[key]
        return rate

    def _forget_vanished(self, records: Mapping[bytes, MutableSequence[Any]]) -> None:
        for key in [key for key in self.suspects if key not in records]:
            del self.suspects[key]
