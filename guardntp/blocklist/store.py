"""The blocklist on disk: one SQLite file in the state directory.

Rule: every change is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so a
writer killed at any instant leaves the file as it was before or after the
change, never in between (an import of ten thousand lines is all or nothing).
WAL mode lets the server read while the CLI writes; ``BEGIN IMMEDIATE`` takes
the write lock up front, so two writers queue on the busy timeout instead of
one failing on a lock upgrade. ``synchronous = FULL``: a committed block
survives a power cut too, and writes are rare enough not to mind the fsync.

Rule: SQLite itself logs which rows change. Triggers on ``blocks`` append the
cidr of every row inserted, updated or deleted to ``changes`` (``seq`` counts
up), whoever writes: this code, an older version, the ``sqlite3`` shell. A
reader that remembers the last ``seq`` it applied reads only what changed
after it (:meth:`BlockStore.read_changes`) instead of every row. Every write
of this module trims the log to the latest ``KEEP_CHANGES``; a reader whose
position is gone (trimmed, another file's log, a ``seq`` gone backwards or
given to another change) is told so and reads every row (:meth:`read_all`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..quoting import one_line, shown
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
#: 1: ``blocks``; 2: the change log (``changes``, ``change_log`` and the triggers).
SCHEMA_VERSION = 2
#: The change log keeps this many of the latest changes. A server reads the log
#: four times a second, so only a change bigger than this (an import of more rows)
#: makes a server that has not seen all of it yet read every row instead; the log
#: stays a few megabytes however many changes are made.
KEEP_CHANGES = 100_000

#: A row as stored: (cidr, action, reason, created_ns, expires_ns, origin).
Row = tuple[str, str, str, int, int | None, str]

_SCHEMA = (f"""
CREATE TABLE IF NOT EXISTS blocks (
    cidr       TEXT PRIMARY KEY,              -- normalised: no host bits, e.g. 192.0.2.0/24
    action     TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in ACTIONS)})),
    reason     TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL,              -- wall-clock Unix ns
    expires_ns INTEGER,                       -- wall-clock Unix ns; NULL = never
    origin     TEXT NOT NULL CHECK (origin IN ({", ".join(repr(o) for o in ORIGINS)}))
)""", "CREATE INDEX IF NOT EXISTS blocks_by_expiry ON blocks (expires_ns)")

# The change log. A change gets the highest seq + 1 (the rowid; the trimming always
# keeps the latest), and statement-level rollback takes back a failed statement's log
# rows, so the seqs of committed changes have no gaps: a reader tells a complete log
# from a trimmed one by counting (read_changes). Not AUTOINCREMENT: its write to
# sqlite_sequence for every row made a million-row import a third slower, and the
# tokens already tell a seq given out again (someone emptied the log) from the one a
# reader saw.
_CHANGE_LOG = (
    """CREATE TABLE IF NOT EXISTS changes (
    seq   INTEGER PRIMARY KEY,
    cidr  TEXT NOT NULL,                  -- of a row inserted, updated or deleted
    token INTEGER NOT NULL                -- random: tells this change from another seq's
)""",
    # One row: a random number made with the log. A file put in place of this one
    # (a restore, a copy) comes with another log, whose seqs say nothing of this one's.
    "CREATE TABLE IF NOT EXISTS change_log (log_id INTEGER NOT NULL)",
    "INSERT INTO change_log (log_id) SELECT random() "
    "WHERE NOT EXISTS (SELECT 1 FROM change_log)",
    """CREATE TRIGGER IF NOT EXISTS blocks_log_insert AFTER INSERT ON blocks BEGIN
    INSERT INTO changes (cidr, token) VALUES (new.cidr, random());
END""",
    # An update that renames a row changes two networks: the old one and the new one.
    """CREATE TRIGGER IF NOT EXISTS blocks_log_update AFTER UPDATE ON blocks BEGIN
    INSERT INTO changes (cidr, token) VALUES (old.cidr, random());
    INSERT INTO changes (cidr, token) SELECT new.cidr, random() WHERE new.cidr IS NOT old.cidr;
END""",
    """CREATE TRIGGER IF NOT EXISTS blocks_log_delete AFTER DELETE ON blocks BEGIN
    INSERT INTO changes (cidr, token) VALUES (old.cidr, random());
END""",
)
#: What a file needs for its changes to be read from the log.
_CHANGE_LOG_OBJECTS = frozenset({"changes", "change_log", "blocks_log_insert",
                                 "blocks_log_update", "blocks_log_delete"})
_COLUMNS = "cidr, action, reason, created_ns, expires_ns, origin"
#: Rows fetched at a time by read_all.
_BATCH = 1024


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where a reader stands in a file's change log: every change up to ``seq``
    of the log ``log_id`` is in what it read. ``token``: that change's own (None:
    no change yet, or its row is gone). An older copy of the same file put back in
    place has the same log and, after a write or two, the same seq again, but not
    the same change at it."""
    log_id: int
    seq: int
    token: int | None


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`BlockStore.read_changes` found: the rows changed since the
    position asked about, as they are now, and the cidrs that have no row any more."""
    position: LogPosition
    rows: list[Row]
    gone: list[str]


class StoreError(Exception):
    """The blocklist file cannot be used; the message names it and says why."""


class BlockStore:
    """One connection to the blocklist file. Not shared between threads."""

    #: How many of the latest changes this connection's writes leave in the log.
    keep_changes = KEEP_CHANGES

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
        #: Can changes be read from the log? (False: a file made by version 1 that
        #: this user may not write, or whose log someone dropped: read every row.)
        self.tracking = False
        #: Why not, in one line, when the file could not be given a change log.
        self.tracking_problem = ""
        #: May this user not write the file? (Its mode, a read-only mount.)
        self.read_only = not os.access(self.path, os.W_OK)
        self._schema_seen = -1
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous = FULL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            present = self._schema_names()
            refused = ""
            if version < SCHEMA_VERSION or not present >= _CHANGE_LOG_OBJECTS:
                refused = self._upgrade(version, "blocks" in present)
            self._check_tracking()
            if refused and not self.tracking:
                self.tracking_problem = (f"{self.path}: cannot add a change log to a file "
                                         f"of an older version ({refused}); every change "
                                         "is read by reading every row")
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def _upgrade(self, version: int, has_blocks: bool) -> str:
        """Make the tables (a new file) or add what a file of an older version lacks,
        in one transaction. A file with entries this user may only read stays usable
        (its readers read every row): then the error, else ""."""
        try:
            # Statement by statement: executescript() would COMMIT our transaction.
            # IF NOT EXISTS throughout: another process may have upgraded it meanwhile.
            with self.transaction():
                for statement in (*_SCHEMA, *_CHANGE_LOG):
                    self.db.execute(statement)
                if version < SCHEMA_VERSION:      # never down, for a newer version's file
                    self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as error:
            if not has_blocks or error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
                raise
            return str(error)
        return ""

    def _schema_names(self) -> set[str]:
        return {name for (name,) in self.db.execute("SELECT name FROM sqlite_master")}

    def _check_tracking(self) -> None:
        """Is the change log (still) there? Asked again only when the schema changed
        (``PRAGMA schema_version``, a counter in the file's header): someone who drops
        a trigger must not leave a reader trusting a log that no longer logs."""
        schema = self.db.execute("PRAGMA schema_version").fetchone()[0]
        if schema != self._schema_seen:
            self.tracking = self._schema_names() >= _CHANGE_LOG_OBJECTS
            self._schema_seen = schema

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

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls the whole change back."""
        return self._between("BEGIN IMMEDIATE")

    @contextlib.contextmanager
    def _between(self, begin: str) -> Iterator[sqlite3.Connection]:
        """``begin`` ... ``COMMIT``, rolled back on any exception and never left open
        (the next BEGIN would fail, on every tick from then on)."""
        self.db.execute(begin)
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
                self._trim(db)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        return added, updated

    def remove(self, network: Network, now_ns: int) -> bool:
        try:
            with self.transaction() as db:
                self._purge(db, now_ns)
                removed = db.execute("DELETE FROM blocks WHERE cidr = ?",
                                     (str(network),)).rowcount > 0
                self._trim(db)
                return removed
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def purge_expired(self, now_ns: int) -> int:
        """Delete the rows expired by ``now_ns`` (and trim the change log: a server runs
        this every minute, so the log stays short even if only others write)."""
        try:
            with self.transaction() as db:
                purged = self._purge(db, now_ns)
                self._trim(db)
                return purged
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def _trim(self, db: sqlite3.Connection) -> None:
        """Keep the latest :attr:`keep_changes` changes, at least one: the latest,
        whose token a reader checks (a range of the primary key: a seek, then only
        the rows that go)."""
        self._check_tracking()
        if not self.tracking:
            return
        head = _head_seq(db)
        keep = max(1, self.keep_changes)
        if head > keep:
            db.execute("DELETE FROM changes WHERE seq <= ?", (head - keep,))

    @staticmethod
    def _purge(db: sqlite3.Connection, now_ns: int) -> int:
        return db.execute("DELETE FROM blocks WHERE expires_ns IS NOT NULL AND expires_ns <= ?",
                          (now_ns,)).rowcount

    # ------------------------------------------------------------------ reads

    def rows(self) -> list[Row]:
        """Every row as stored (expired ones included), in CIDR order."""
        try:
            return self.db.execute(f"SELECT {_COLUMNS} FROM blocks ORDER BY cidr").fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    @contextlib.contextmanager
    def read_all(self) -> Iterator[tuple[LogPosition | None, Iterator[Row]]]:
        """Where the change log stands (None: the file has no usable log) and every
        row as stored then (expired ones included, in no order), for the ``with``
        block to go through: one read transaction. A batch of rows at a time, not a
        list of them all: a million rows would be ~300 MB at once, and the memory of
        the rows read would stay with the process, freed but not given back."""
        try:
            with self._snapshot():
                position = self._position()
                cursor = self.db.execute(f"SELECT {_COLUMNS} FROM blocks")
                yield position, self._batches(cursor)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None

    def _batches(self, cursor: sqlite3.Cursor) -> Iterator[Row]:
        while True:
            try:
                batch: list[Row] = cursor.fetchmany(_BATCH)
            except sqlite3.Error as error:
                raise StoreError(f"{self.path}: {error}") from None
            if not batch:
                return
            yield from batch

    def read_changes(self, since: LogPosition) -> Changes | None:
        """The rows changed after ``since``, each once, as they are now; or None if
        the log cannot tell (it was trimmed past ``since``, it is another file's log,
        its seq went backwards, or there is none): then read every row. The cost is
        that of the changes, whatever the number of rows."""
        try:
            with self._snapshot():
                position = self._position()
                if (position is None or position.log_id != since.log_id
                        or position.seq < since.seq):
                    return None
                if since.seq and (since.token is None or self.db.execute(
                        "SELECT token FROM changes WHERE seq = ?",
                        (since.seq,)).fetchone() != (since.token,)):
                    return None     # not the change this reader saw there (or trimmed)
                if position.seq == since.seq:
                    return Changes(position, [], [])
                # The seqs have no gaps (see _CHANGE_LOG): fewer rows than seqs means
                # some were trimmed away, and with them changes this reader never saw.
                logged = self.db.execute("SELECT count(*) FROM changes WHERE seq > ?",
                                         (since.seq,)).fetchone()[0]
                if logged != position.seq - since.seq:
                    return None
                found = self.db.execute(
                    "SELECT changed.cidr, blocks.cidr IS NOT NULL, blocks.action, "
                    "blocks.reason, blocks.created_ns, blocks.expires_ns, blocks.origin "
                    "FROM (SELECT DISTINCT cidr FROM changes WHERE seq > ?) AS changed "
                    "LEFT JOIN blocks ON blocks.cidr = changed.cidr",
                    (since.seq,)).fetchall()
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        rows: list[Row] = []
        gone: list[str] = []
        for cidr, present, *rest in found:
            if present:
                rows.append((cidr, *rest))
            else:
                gone.append(cidr)
        return Changes(position, rows, gone)

    def _snapshot(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One read transaction: the statements in it see the same committed state
        (WAL: writers go on meanwhile)."""
        return self._between("BEGIN")

    def _position(self) -> LogPosition | None:
        self._check_tracking()
        if not self.tracking:
            return None
        log_ids = self.db.execute("SELECT log_id FROM change_log LIMIT 2").fetchall()
        if len(log_ids) != 1:
            return None
        head = _head_seq(self.db)
        token = self.db.execute("SELECT token FROM changes WHERE seq = ?", (head,)).fetchone()
        return LogPosition(log_ids[0][0], head, None if token is None else token[0])

    def entries(self) -> list[BlockEntry]:
        """Every row as an entry; a row no entry can be made of (written with the
        ``sqlite3`` shell, say) is a :class:`StoreError` naming it."""
        return [self._entry(row) for row in self.rows()]

    def get(self, network: Network) -> BlockEntry | None:
        try:
            row = self.db.execute("SELECT cidr, action, reason, created_ns, expires_ns, "
                                  "origin FROM blocks WHERE cidr = ?",
                                  (str(network),)).fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None
        return self._entry(row) if row else None

    def _entry(self, row: Row) -> BlockEntry:
        try:
            return entry_from_row(row)
        except (ValueError, TypeError) as error:
            raise StoreError(f"{self.path}: the row for {shown(row[0])} is not a blocklist "
                             f"entry ({one_line(error, 200)}); fix or delete "
                             "it with sqlite3") from None

    def data_version(self) -> int:
        """Changes when *another* connection commits (SQLite's own change counter)."""
        try:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {error}") from None


def _head_seq(db: sqlite3.Connection) -> int:
    """The latest change's seq (0: none); the end of the primary key, one seek."""
    found = db.execute("SELECT max(seq) FROM changes").fetchone()[0]
    return int(found) if found is not None else 0


def entry_from_row(row: Row) -> BlockEntry:
    """The entry a row stores; ValueError or TypeError for a row that is not one (the
    file's CHECK constraints leave the types and the cidr's form to its writers)."""
    cidr, action, reason, created_ns, expires_ns, origin = row
    if cidr.__class__ is not str:
        raise TypeError(f"the cidr {cidr!r} is not text")
    if action not in ACTIONS or origin not in ORIGINS:
        raise ValueError(f"action {action!r} or origin {origin!r} is unknown")
    if not isinstance(reason, str):
        raise TypeError(f"the reason {reason!r} is not text")
    for value in (created_ns, expires_ns):
        if value is not None and value.__class__ is not int:
            raise TypeError(f"the time {value!r} is not an integer")
    if created_ns is None:
        raise TypeError("created_ns is empty")
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
