"""The blocklist inside a running server: SQLite changes reach the filter within a second.

Rule: this is the edge between the store and the pipeline. A timer on the
server's loop asks SQLite for ``PRAGMA data_version`` (a counter that moves
when another connection commits; no table is read) and only on a change
reads the rows and hands them to ``Pipeline.set_blocklist``. Buckets and
counters are untouched: only the access list is rebuilt. Expiry needs no
timer of its own (a lookup ignores an expired entry); the list is still
rebuilt when the next entry lapses, to keep the table small.

The server's connection waits at most ``BUSY_MS`` for a lock: a long import
by the CLI must not stall the packet loop, so a busy moment is retried on the
next tick instead.
"""

from __future__ import annotations

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
        self._cache: dict[_Row, AclEntry] = {}
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
            if version != self._version or (expiry is not None and now_ns >= expiry):
                self._version = version
                self.load(now_ns)
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
        """Read every row and give the live ones to the filter."""
        cache = self._cache
        fresh: dict[_Row, AclEntry] = {}
        next_expiry: int | None = None
        for row in self.store.rows():
            expires_ns = row[4]
            if expires_ns is not None:
                if expires_ns <= now_ns:
                    continue
                next_expiry = expires_ns if next_expiry is None else min(next_expiry,
                                                                          expires_ns)
            entry = cache.get(row)
            fresh[row] = entry if entry is not None else entry_from_row(row).acl_entry()
        self._cache = fresh
        self._next_expiry_ns = next_expiry
        self.pipeline.set_blocklist(list(fresh.values()))
        self.active_entries = len(fresh)
        self.loads += 1
        log.debug("blocklist: %d active entries", len(fresh))

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
