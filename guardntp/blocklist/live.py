"""The blocklist inside a running server: SQLite changes reach the filter within a second.

Rule: this is the edge between the store and the pipeline. A timer on the
server's loop asks SQLite for ``PRAGMA data_version`` (a counter that moves
when another connection commits; no table is read) and only on a change
reads the rows, compares them with what it applied last (by network) and
hands the difference to ``Pipeline.update_blocklist``: a ``block add`` among
100 000 entries is one entry written into the access list, not a new list.
Buckets and counters are untouched. Expiry needs no timer of its own (a lookup
ignores an expired entry); when the next entry lapses it is removed (a heap of
expiries says which, no row is read), to keep the table small.

The server's connection waits at most ``BUSY_MS`` for a lock: a long import
by the CLI must not stall the packet loop, so a busy moment is retried on the
next tick instead.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..filter.acl import AclEntry
from ..filter.pipeline import Pipeline
from .auto import AutoBlocker, AutoPolicy, network_of_key
from .entries import BlockEntry, format_duration
from .store import BlockStore, StoreError, entry_from_row

log = logging.getLogger("guardntp.blocklist")

#: How often the server looks for changes: well inside the promised second.
REFRESH_S = 0.25
#: How long the server's connection waits for a lock before trying again next tick.
BUSY_MS = 20
#: Expired rows are deleted from the file this often (by whoever writes first).
PURGE_NS = 60 * 1_000_000_000
#: Automatic blocks waiting for the lock; beyond this a flood of new offenders waits.
MAX_PENDING_AUTO = 4096

_Row = tuple[str, str, str, int, int | None, str]


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
        self._inode = store.path.stat().st_ino
        self._next_expiry_ns: int | None = None
        #: What the filter has now, by the store's cidr (str(network)): the row it
        #: came from and the entry made of it.
        self._applied: dict[str, tuple[_Row, AclEntry]] = {}
        #: (expires_ns, network) of applied entries, soonest first; stale items (an
        #: entry since replaced or removed) are skipped when they come up.
        self._expiries: list[tuple[int, str]] = []
        self._pending_auto: dict[bytes, BlockEntry] = {}
        self._last_purge_ns: int | None = None
        # What `guardntp stats` reports.
        self.active_entries = 0
        self.loads = 0
        self.auto_blocked = 0
        self.last_error = ""

    # ------------------------------------------------------------------ timer

    def refresh(self) -> None:
        """The periodic task: reload on a change or a lapse; run the auto scan."""
        now_ns = self.wall_ns()
        try:
            self._follow_file()
            self._write_pending_auto(now_ns)
            version = self.store.data_version()
            expiry = self._next_expiry_ns
            if version != self._version:
                self.load(now_ns)
                self._version = version     # only once loaded: a failed read is retried
            elif expiry is not None and now_ns >= expiry:
                self._expire(now_ns)        # nobody else wrote: the rows are as loaded
            mono_ns = self.monotonic_ns()
            if self._last_purge_ns is None or mono_ns - self._last_purge_ns >= PURGE_NS:
                self._last_purge_ns = mono_ns
                self.store.purge_expired(now_ns)
            self.last_error = ""
        except StoreError as error:
            if str(error) != self.last_error:
                log.warning("blocklist: %s (retrying)", error)
            self.last_error = str(error)
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
        log.info("blocklist: %s was replaced; reading the new file", fresh.path)

    def load(self, now_ns: int) -> None:
        """Read every row and give the filter what changed since the last load: rows
        new or different (by network) are added, networks no live row has any more
        are removed. Nothing is applied unless all of it can be (a bad row raises
        with the filter as it was)."""
        applied = self._applied
        fresh: dict[str, tuple[_Row, AclEntry]] = {}
        added: list[AclEntry] = []
        added_at: list[str] = []
        kept = 0        # networks applied before that a live row still has
        for row in self.store.rows():
            expires_ns = row[4]
            if expires_ns is not None and expires_ns <= now_ns:
                continue
            # Keyed by the store's cidr, its primary key, written normalised (str of the
            # network): one row per network, as the filter holds one entry per network.
            cidr = row[0]
            old = applied.get(cidr)
            if old is not None:
                kept += 1
                if old[0] == row:
                    fresh[cidr] = old
                    continue
            entry = entry_from_row(row).acl_entry()
            fresh[cidr] = (row, entry)
            added.append(entry)
            added_at.append(cidr)
        removed = ([] if kept == len(applied) else
                   [old[1].network for cidr, old in applied.items() if cidr not in fresh])
        if added or removed:
            self.pipeline.update_blocklist(added, removed)
        # -- applied: from here on nothing can fail
        self._applied = fresh
        expiries = self._expiries
        if len(expiries) + len(added) > 2 * len(fresh) + 64:   # mostly stale: start afresh
            expiries = [(entry.expires_ns, cidr) for cidr, (_, entry) in fresh.items()
                        if entry.expires_ns is not None]
            heapq.heapify(expiries)
        else:
            pairs = [(entry.expires_ns, cidr) for entry, cidr in zip(added, added_at, strict=True)
                     if entry.expires_ns is not None]
            if len(pairs) > 64:          # an import: one heapify, not a push each
                expiries.extend(pairs)
                heapq.heapify(expiries)
            else:
                for pair in pairs:
                    heapq.heappush(expiries, pair)
        self._expiries = expiries
        self._next_expiry_ns = expiries[0][0] if expiries else None
        self.active_entries = len(fresh)
        self.loads += 1
        log.debug("blocklist: %d active entries (%d added or changed, %d removed)",
                  len(fresh), len(added), len(removed))

    def _expire(self, now_ns: int) -> None:
        """Remove the applied entries that have lapsed by ``now_ns``, and only those:
        the store has not changed since the last load (its data_version says so), so
        no row needs reading."""
        applied = self._applied
        expiries = self._expiries
        lapsed: dict[str, AclEntry] = {}
        while expiries and expiries[0][0] <= now_ns:
            cidr = heapq.heappop(expiries)[1]
            current = applied.get(cidr)
            if current is not None:
                expires_ns = current[1].expires_ns
                if expires_ns is not None and expires_ns <= now_ns:
                    lapsed[cidr] = current[1]
        try:
            if lapsed:
                self.pipeline.update_blocklist((), [entry.network for entry in lapsed.values()])
        except BaseException:
            for cidr, entry in lapsed.items():     # as it was: tried again next tick
                assert entry.expires_ns is not None
                heapq.heappush(expiries, (entry.expires_ns, cidr))
            raise
        for cidr in lapsed:
            del applied[cidr]
        self._next_expiry_ns = expiries[0][0] if expiries else None
        self.active_entries = len(applied)
        if lapsed:
            log.debug("blocklist: %d entries lapsed, %d active", len(lapsed), len(applied))

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
