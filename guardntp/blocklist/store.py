"""The blocklist on disk: one SQLite file in the state directory.

Rule: every change is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so a
writer killed at any instant leaves the file as it was before or after the
change, never in between (an import of ten thousand lines is all or nothing).
WAL mode lets the server read while the CLI writes; ``BEGIN IMMEDIATE`` takes
the write lock up front, so two writers queue on the busy timeout instead of
one failing on a lock upgrade. ``synchronous = FULL``: a committed block
survives a power cut too, and writes are rare enough not to mind the fsync.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..statedir import (
    StateDirError,
    check_state_file,
    hand_over_fd,
    open_state_file,
    prepare_state_dir,
    restrict_mode,
    same_file,
)
from .entries import ACTIONS, ORIGINS, BlockEntry, Network

FILENAME = "blocklist.sqlite3"
#: Files SQLite makes next to the database, by the database's name plus these.
SIDE_FILES = ("-wal", "-shm", "-journal")
SCHEMA_VERSION = 1

_SCHEMA = (f"""
CREATE TABLE IF NOT EXISTS blocks (
    cidr       TEXT PRIMARY KEY,              -- normalised: no host bits, e.g. 192.0.2.0/24
    action     TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in ACTIONS)})),
    reason     TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL,              -- wall-clock Unix ns
    expires_ns INTEGER,                       -- wall-clock Unix ns; NULL = never
    origin     TEXT NOT NULL CHECK (origin IN ({", ".join(repr(o) for o in ORIGINS)}))
)""", "CREATE INDEX IF NOT EXISTS blocks_by_expiry ON blocks (expires_ns)")


class StoreError(Exception):
    """The blocklist file cannot be used; the message names it and says why."""


class BlockStore:
    """One connection to the blocklist file. Not shared between threads."""

    def __init__(self, path: Path, busy_timeout_ms: int = 10_000, create: bool = True) -> None:
        """Open (or make, with ``create``) the file; its directory is checked and made the
        way :func:`guardntp.statedir.prepare_state_dir` says. Raises :class:`StoreError`."""
        self.path = path
        try:
            prepare_state_dir(path.parent, create)
            # SQLite opens these by name too: its own O_NOFOLLOW stops a symlink there
            # (with an unhelpful message), but not a hard link to someone else's file.
            for suffix in SIDE_FILES:
                check_state_file(path.parent / (path.name + suffix))
            # Made here, 0600 and never through a link, so that SQLite never makes it.
            fd = open_state_file(path, create)
        except FileNotFoundError as error:
            raise StoreError(f"{path}: no blocklist yet" if not create
                             else f"{path}: {error.strerror}") from None
        except StateDirError as error:
            raise StoreError(str(error)) from None
        try:
            restrict_mode(fd)
            # Before SQLite makes the side files: it gives them the database's owner.
            _hand_to_directory_owner(path)
            self._connect(fd, busy_timeout_ms)
        finally:
            os.close(fd)

    def _connect(self, fd: int, busy_timeout_ms: int) -> None:
        # mode=rw: SQLite opens the file made or checked above and never creates one.
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self.db = sqlite3.connect(uri, isolation_level=None,
                                      timeout=busy_timeout_ms / 1000, uri=True)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        try:
            self._check_opened(fd)
            self._set_up(busy_timeout_ms)
        except BaseException:
            self.db.close()
            raise

    def _check_opened(self, fd: int) -> None:
        """SQLite opened the name, which may have pointed elsewhere for a moment: before
        it writes anything or opens a side file (so far it has read the 100-byte header
        at most), check that it has the file checked on ``fd``."""
        try:
            opened = self.db.execute("PRAGMA database_list").fetchone()[2]
            named = os.stat(self.path, follow_symlinks=False)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        except OSError as error:
            raise StoreError(f"{self.path}: {error.strerror}") from None
        expected = os.path.join(os.path.realpath(self.path.parent), self.path.name)
        if opened != expected or not same_file(named, os.fstat(fd)):
            raise StoreError(f"{self.path} changed while it was being opened; refusing it")

    def _set_up(self, busy_timeout_ms: int) -> None:
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous = FULL")
            if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # Statement by statement: executescript() would COMMIT our transaction.
                with self.transaction():
                    for statement in _SCHEMA:
                        self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path, busy_timeout_ms: int = 10_000,
                     create: bool = True) -> BlockStore:
        return cls(state_dir / FILENAME, busy_timeout_ms, create)

    def close(self) -> None:
        self.db.close()

    def hand_over(self, uid: int, gid: int) -> None:
        """Give the file (and its -wal, -shm) to the user a server is about to become."""
        for name in (self.path.name, self.path.name + "-wal", self.path.name + "-shm"):
            _hand_over_file(self.path.parent / name, uid, gid)

    def set_busy_timeout(self, busy_timeout_ms: int) -> None:
        self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls the whole change back."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (a full disk, say); a
            # ROLLBACK then fails and must not hide the error that says what happened.
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writes

    def upsert(self, entries: Iterable[BlockEntry], now_ns: int,
               replace_origin: str | None = None) -> tuple[int, int]:
        """Add or update entries in one transaction: (added, updated).

        ``replace_origin``: first remove every entry of that origin (a feed that
        is re-imported whole). Expired entries are purged in the same transaction.
        """
        added = updated = 0
        try:
            with self.transaction() as db:
                self._purge(db, now_ns)
                if replace_origin is not None:
                    db.execute("DELETE FROM blocks WHERE origin = ?", (replace_origin,))
                for entry in entries:
                    cursor = db.execute(
                        "UPDATE blocks SET action = ?, reason = ?, created_ns = ?, "
                        "expires_ns = ?, origin = ? WHERE cidr = ?",
                        (entry.action, entry.reason, entry.created_ns, entry.expires_ns,
                         entry.origin, entry.cidr))
                    if cursor.rowcount:
                        updated += 1
                        continue
                    db.execute("INSERT INTO blocks (cidr, action, reason, created_ns, "
                               "expires_ns, origin) VALUES (?, ?, ?, ?, ?, ?)",
                               (entry.cidr, entry.action, entry.reason, entry.created_ns,
                                entry.expires_ns, entry.origin))
                    added += 1
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        return added, updated

    def remove(self, network: Network, now_ns: int) -> bool:
        try:
            with self.transaction() as db:
                self._purge(db, now_ns)
                return db.execute("DELETE FROM blocks WHERE cidr = ?",
                                  (str(network),)).rowcount > 0
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def purge_expired(self, now_ns: int) -> int:
        try:
            with self.transaction() as db:
                return self._purge(db, now_ns)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    @staticmethod
    def _purge(db: sqlite3.Connection, now_ns: int) -> int:
        return db.execute("DELETE FROM blocks WHERE expires_ns IS NOT NULL AND expires_ns <= ?",
                          (now_ns,)).rowcount

    # ------------------------------------------------------------------ reads

    def rows(self) -> list[tuple[str, str, str, int, int | None, str]]:
        """Every row as stored (expired ones included), in CIDR order."""
        try:
            return self.db.execute("SELECT cidr, action, reason, created_ns, expires_ns, origin "
                                   "FROM blocks ORDER BY cidr").fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def entries(self) -> list[BlockEntry]:
        return [entry_from_row(row) for row in self.rows()]

    def get(self, network: Network) -> BlockEntry | None:
        row = self.db.execute("SELECT cidr, action, reason, created_ns, expires_ns, origin "
                              "FROM blocks WHERE cidr = ?", (str(network),)).fetchone()
        return entry_from_row(row) if row else None

    def data_version(self) -> int:
        """Changes when *another* connection commits (SQLite's own change counter)."""
        try:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None


def entry_from_row(row: tuple[str, str, str, int, int | None, str]) -> BlockEntry:
    cidr, action, reason, created_ns, expires_ns, origin = row
    return BlockEntry(ipaddress.ip_network(cidr), action, reason, created_ns, expires_ns, origin)


def _hand_to_directory_owner(path: Path) -> None:
    """Root running the CLI must not leave files the server's own user cannot write:
    SQLite in WAL mode needs write access to the -wal and -shm files even to read.
    Only files root owns are given away, each on its own checked descriptor."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(path.parent)
    except OSError:
        return  # best effort: the server reports a permission problem itself
    if owner.st_uid == 0:
        return
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        # Best effort, as above; a refusal (StoreError) is not.
        with contextlib.suppress(OSError):
            _hand_over_file(path.parent / name, owner.st_uid, owner.st_gid, only_from_uid=0)


def _hand_over_file(path: Path, uid: int, gid: int, only_from_uid: int | None = None) -> None:
    """Give a state file, if there is one, to ``uid``:``gid``, on a checked descriptor
    (never following its name); with ``only_from_uid``, only if that uid owns it."""
    try:
        fd = open_state_file(path)
    except FileNotFoundError:
        return
    except StateDirError as error:
        raise StoreError(str(error)) from None
    try:
        if only_from_uid is None or os.fstat(fd).st_uid == only_from_uid:
            hand_over_fd(fd, uid, gid)
    finally:
        os.close(fd)
