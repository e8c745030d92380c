"""The blocklist inside a running server: SQLite changes reach the filter within a second.

Rule: this is the edge between the store and the pipeline. A timer on the
server's loop asks SQLite for ``PRAGMA data_version`` (a counter that moves
when another connection commits; no table is read) and only on a change
reads what changed since the last load: the store's change log (filled by
SQLite triggers, whoever writes) names the rows, and only those are read
and compared with what the access list holds on their network (it is the
one record of what was applied: nothing is kept here per entry). The
difference goes to ``Pipeline.write_blocklist``, network by network with the
shared verdict each row says (no entry object per row): a ``block add`` among a
million entries reads one row and writes one slot of the access list, not a
new list. Every row is read only when the log cannot say what changed (the
first load, a replaced file, a log trimmed past what this server saw, a file
of the previous version this server may not write). Buckets and counters are
untouched. Expiry needs no timer of its own
(a lookup ignores an expired entry); when an expiry time comes, the lapsed
entries are swept out of the access list a bounded number of slots per tick
(no row is read), to keep the table small.

The server's connection waits at most ``BUSY_MS`` for a lock: a long import
by the CLI must not stall the packet loop, so a busy moment is retried on the
next tick instead.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from ..filter.acl import AccessList, BlockVerdict, NetworkKey, network_key_of_text
from ..filter.pipeline import Pipeline
from .auto import AutoBlocker, AutoPolicy, network_of_key
from .entries import ACTIONS, BlockEntry, format_duration
from .store import BlockStore, Changes, LogPosition, Row, StoreError

log = logging.getLogger("guardntp.blocklist")

#: How often the server looks for changes: well inside the promised second.
REFRESH_S = 0.25
#: How long the server's connection waits for a lock before trying again next tick.
BUSY_MS = 20
#: Expired rows are deleted from the file this often (by whoever writes first).
PURGE_NS = 60 * 1_000_000_000
#: Automatic blocks waiting for the lock; beyond this a flood of new offenders waits.
MAX_PENDING_AUTO = 4096
#: Slots of the blocklist table one timer tick sweeps for lapsed entries: a fraction
#: of a millisecond of the packet loop's time however large the list.
SWEEP_SLOTS = 50_000
#: Bytes of an emptied blocklist table given back to the kernel per tick: a
#: million-entry table's 16 MB at once would hold the packet loop for milliseconds.
RELEASE_BYTES = 1 << 20


class LiveBlocklist:
    def __init__(self, store: BlockStore, pipeline: Pipeline, auto: AutoPolicy,
                 wall_ns: Callable[[], int] = time.time_ns,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.store = store
        self.pipeline = pipeline
        self.auto = AutoBlocker(auto)
        self.wall_ns = wall_ns
        self.monotonic_ns = monotonic_ns
        self._version: int | None = None
        #: Where this server stands in the store's change log; None: read every row.
        self._position: LogPosition | None = None
        self._inode = store.path.stat().st_ino
        self._warn_about(store)
        #: Expiry times of what was applied, each once (an import's entries share one):
        #: when one comes, the access list sweeps out the entries that lapsed.
        self._expiry_times: list[int] = []
        self._expiry_known: set[int] = set()
        #: A sweep of lapsed entries under way (bounded work per tick).
        self._sweeping = False
        self._pending_auto: dict[bytes, BlockEntry] = {}
        self._last_purge_ns: int | None = None
        # What `guardntp stats` reports.
        self.active_entries = 0
        self.loads = 0
        self.auto_blocked = 0
        self.last_error = ""

    # ------------------------------------------------------------------ timer

    def refresh(self) -> None:
        """The periodic task: apply the store's changes and lapsed entries; run the
        auto scan."""
        now_ns = self.wall_ns()
        try:
            self._follow_file()
            read_only = self.store.read_only    # said once (_warn_about); no write tried
            if not read_only:
                self._write_pending_auto(now_ns)
            version = self.store.data_version()
            if version != self._version:
                self.load(now_ns)
                self._version = version     # only once loaded: a failed read is retried
            mono_ns = self.monotonic_ns()
            last = self._last_purge_ns
            if not read_only and (last is None or mono_ns - last >= PURGE_NS):
                self._last_purge_ns = mono_ns
                self.store.purge_expired(now_ns)
            self.last_error = ""
        except StoreError as error:
            if str(error) != self.last_error:
                log.warning("blocklist: %s (retrying)", error)
            self.last_error = str(error)
        times = self._expiry_times
        if times and times[0] <= now_ns:
            while times and times[0] <= now_ns:
                self._expiry_known.discard(heapq.heappop(times))
            self._sweeping = True
        if self._sweeping:
            # Needs no row: an applied entry past its expiry is lapsed whatever the
            # file says now (a lookup already ignores it), so a store that cannot be
            # read does not hold this up.
            self._sweep(now_ns)
        self.pipeline.release_blocklist_memory(RELEASE_BYTES)
        if self.auto.policy.enabled:
            self._scan(now_ns)

    def _follow_file(self) -> None:
        """An operator who deletes or replaces the file gets the new one used (a stat
        per tick); while there is none, the entries already loaded stay in force."""
        try:
            inode = self.store.path.stat().st_ino
        except FileNotFoundError:
            return
        if inode == self._inode:
            return
        fresh = BlockStore(self.store.path, BUSY_MS)
        self.store.close()
        self.store = fresh
        self._inode = inode
        self._version = None
        self._position = None       # another file, another log: read it whole
        log.info("blocklist: %s was replaced; reading the new file", fresh.path)
        self._warn_about(fresh)

    @staticmethod
    def _warn_about(store: BlockStore) -> None:
        """One line, once per file, for a file this server can read but not fully use."""
        problems = [store.tracking_problem] if store.tracking_problem else []
        if store.read_only:
            problems.append(f"{store.path} is read-only for this user: expired rows stay "
                            "until a writer purges them, and automatic blocks wait")
        if problems:
            log.warning("blocklist: %s", "; ".join(problems))

    def load(self, now_ns: int) -> None:
        """Give the filter what changed in the store since the last load: the rows the
        change log names (or, when it cannot say, every row) are compared with what
        was applied, by cidr; new or different entries are added, cidrs no live row
        has any more are removed. Nothing is applied unless all of it can be: a bad
        row raises :class:`StoreError` with the filter as it was, and the same
        change is read again next time."""
        changes = None if self._position is None else self.store.read_changes(self._position)
        if changes is None:
            self._load_all(now_ns)
        else:
            self._load_changes(changes, now_ns)

    def _load_changes(self, changes: Changes, now_ns: int) -> None:
        """The rows the log named: each cidr once, either gone or as it is now."""
        held = self.pipeline.acl.blocklist_verdict
        make = _VerdictMaker(self.store, self.pipeline.acl)
        wanted: dict[NetworkKey, BlockVerdict | None] = {}
        removed = 0
        for cidr in changes.gone:
            key = make.key_or_none(cidr)
            if key is not None and held(key) is not None:
                wanted[key] = None
                removed += 1
        for row in changes.rows:
            key = make.key(row)
            old = held(key)
            if _lapsed(row, now_ns):
                if old is not None:
                    wanted[key] = None
                    removed += 1
            elif old is None or not make.same(row, old):   # same: only created_ns moved
                wanted[key] = make.verdict(row)
        if wanted:
            self.pipeline.write_blocklist(wanted)
        self._expiries_for(make.made)
        self._loaded(changes.position, len(wanted) - removed, removed, now_ns)

    def _load_all(self, now_ns: int) -> None:
        """Every row read and compared with what was applied: the first load, or the
        log cannot say what changed. What no live row holds any more is removed."""
        held = self.pipeline.acl.blocklist_verdict
        make = _VerdictMaker(self.store, self.pipeline.acl)
        live: set[NetworkKey] = set()
        wanted: dict[NetworkKey, BlockVerdict | None] = {}
        kept = 0        # networks applied before that a live row still has
        with self.store.read_all() as (position, rows):
            for row in rows:
                if _lapsed(row, now_ns):
                    continue
                key = make.key(row)
                live.add(key)
                old = held(key)
                if old is not None:
                    kept += 1
                    if make.same(row, old):
                        continue
                wanted[key] = make.verdict(row)
        added = len(wanted)
        table = self.pipeline.acl.block_table
        if kept != len(table):
            for packed, prefixlen, _ in table.items():
                if (packed, prefixlen) not in live:
                    wanted[(packed, prefixlen)] = None
        if wanted:
            self.pipeline.write_blocklist(wanted)
        self._expiries_for(make.made)
        self._loaded(position, added, len(wanted) - added, now_ns)

    def _loaded(self, position: LogPosition | None, added: int, removed: int,
                now_ns: int) -> None:
        self._position = position
        acl = self.pipeline.acl
        self.active_entries = len(acl.block_table) - (
            acl.lapsed_blocklist_entries(now_ns) if self._sweeping else 0)
        self.loads += 1
        log.debug("blocklist: %d entries (%d added or changed, %d removed)",
                  self.active_entries, added, removed)

    def _expiries_for(self, verdicts: Iterable[BlockVerdict]) -> None:
        """Know when the entries just written lapse (the distinct expiry times only)."""
        known = self._expiry_known
        for verdict in verdicts:
            expires_ns = verdict.expires_ns
            if expires_ns is not None and expires_ns not in known:
                known.add(expires_ns)
                heapq.heappush(self._expiry_times, expires_ns)

    def _sweep(self, now_ns: int) -> None:
        """One bounded step of taking lapsed entries out of the access list."""
        left = self.pipeline.expire_blocklist(now_ns, SWEEP_SLOTS)
        self._sweeping = left > 0
        self.active_entries = len(self.pipeline.acl.block_table) - left

    # ------------------------------------------------------------------ automatic blocks

    def set_auto_policy(self, policy: AutoPolicy) -> None:
        if policy != self.auto.policy:
            self.auto.policy = policy
            if not policy.enabled:
                self.auto.suspects.clear()
            state = (f"on (after {policy.after_s:g}s over the limit, ttl "
                     f"{format_duration(policy.ttl_s)})" if policy.enabled else "off")
            log.info("blocklist: automatic blocking %s", state)

    def _scan(self, wall_now_ns: int) -> None:
        due = self.auto.scan(self.pipeline.sources.records, self.monotonic_ns())
        policy = self.auto.policy
        for key, rate in due:
            if len(self._pending_auto) >= MAX_PENDING_AUTO:
                break
            network = network_of_key(key)
            self._pending_auto[key] = BlockEntry(
                network, policy.action,
                f"auto: {rate:.1f} limited requests/s for over {policy.after_s:g}s",
                wall_now_ns, wall_now_ns + policy.ttl_s * 1_000_000_000, "auto")
            log.warning("blocklist: auto-blocking %s for %s (%.1f limited requests/s)",
                        network, format_duration(policy.ttl_s), rate)
        if due:
            try:
                self._write_pending_auto(wall_now_ns)
            except StoreError as error:
                log.info("blocklist: auto entries wait for the lock: %s", error)

    def _write_pending_auto(self, now_ns: int) -> None:
        if not self._pending_auto:
            return
        entries = list(self._pending_auto.values())
        self.store.upsert(entries, now_ns)
        self._pending_auto.clear()
        self.auto_blocked += len(entries)
        # Our own commit does not move our data_version: load now.
        self.load(now_ns)

    def close(self) -> None:
        self.store.close()


def _lapsed(row: Row, now_ns: int) -> bool:
    expires_ns = row[4]
    return expires_ns is not None and expires_ns.__class__ is int and expires_ns <= now_ns


class _VerdictMaker:
    """Networks and verdicts from rows, checked: a bad row is a one-line StoreError,
    not a traceback from the packet loop. The access list keeps one shared verdict per
    distinct action, origin, reason and expiry; ``made`` are those this load asked for
    (an import of a million rows: one)."""

    def __init__(self, store: BlockStore, acl: AccessList) -> None:
        self.path = store.path
        self.acl = acl
        self._by_row: dict[tuple[object, ...], BlockVerdict] = {}

    @property
    def made(self) -> Iterable[BlockVerdict]:
        return self._by_row.values()

    @staticmethod
    def same(row: Row, verdict: BlockVerdict) -> bool:
        """Would ``row`` say what ``verdict`` says? (Its network keyed both.)"""
        _, action, reason, _, expires_ns, origin = row
        return (ACTIONS.get(action) is verdict.action and expires_ns == verdict.expires_ns
                and reason == verdict.reason and origin == verdict.origin)

    def key(self, row: Row) -> NetworkKey:
        """The row's network, as the access list keys it."""
        try:
            return network_key_of_text(row[0])
        except (ValueError, TypeError) as error:
            raise self._bad(row, str(error)) from None

    @staticmethod
    def key_or_none(cidr: str) -> NetworkKey | None:
        try:
            return network_key_of_text(cidr)
        except (ValueError, TypeError):
            return None     # (never applied, then)

    def verdict(self, row: Row) -> BlockVerdict:
        """The shared verdict of what ``row`` says."""
        _, action, reason, _, expires_ns, origin = row
        said = (action, reason, expires_ns, origin)
        verdict = self._by_row.get(said)
        if verdict is None:
            if action not in ACTIONS:
                raise self._bad(row, f"unknown action {action!r}")
            if not isinstance(reason, str) or not isinstance(origin, str):
                raise self._bad(row, "reason and origin must be text")
            if expires_ns is not None and expires_ns.__class__ is not int:
                raise self._bad(row, f"expires_ns {expires_ns!r} is not an integer")
            verdict = self._by_row[said] = self.acl.verdict(ACTIONS[action], origin, reason,
                                                            expires_ns)
        return verdict

    def _bad(self, row: Row, why: str) -> StoreError:
        return StoreError(f"{self.path}: the row for {row[0]!r} cannot be applied ({why}); "
                          "no change is applied until it is fixed or removed")


class BlocklistError(Exception):
    """The blocklist cannot be opened or read at start; the message is one line."""


class _Loop(Protocol):
    def add_periodic(self, interval_s: float, callback: Callable[[], None]) -> None: ...


def setup_blocklist(state_dir: Path, pipeline: Pipeline, loop: _Loop, auto: AutoPolicy,
                    owner: tuple[int, int] | None = None) -> LiveBlocklist:
    """Open the store under the state directory, apply it, and start the timer.

    ``owner``: the (uid, gid) the server drops to after start, who must be able to
    write the file. Raises :class:`BlocklistError`.
    """
    try:
        # Patient while starting (an import may hold the lock), brief once serving.
        store = BlockStore.in_state_dir(state_dir)
    except StoreError as error:
        raise BlocklistError(f"blocklist: {error}") from None
    live = LiveBlocklist(store, pipeline, auto)
    try:
        live._version = store.data_version()
        live.load(live.wall_ns())
        store.set_busy_timeout(BUSY_MS)
        if owner is not None:
            store.hand_over(*owner)
    except StoreError as error:
        store.close()
        raise BlocklistError(f"blocklist: {error}") from None
    except OSError as error:
        store.close()
        raise BlocklistError(f"blocklist: {store.path}: {error.strerror}") from None
    if live.active_entries:
        log.info("blocklist: %d active entries from %s", live.active_entries, store.path)
    loop.add_periodic(REFRESH_S, live.refresh)
    return live
