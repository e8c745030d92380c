"""Blocklist changes reach a server's filter by the store's change log, not by reading every row.

Each test drives a LiveBlocklist over a real Pipeline and a real SQLite file,
with a second connection (or process) writing as ``guardntp block`` does, and
compares the filter's blocklist layer with what the store says at that moment.
Clocks are virtual; nothing here needs a socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from guardntp.blocklist.auto import parse_auto_policy
from guardntp.blocklist.entries import BlockEntry, Network
from guardntp.blocklist.live import LiveBlocklist
from guardntp.blocklist.store import FILENAME, BlockStore, Changes, LogPosition, Row
from guardntp.clock import ClockState
from guardntp.filter.acl import AclEntry, Action, BlockVerdict, NetworkKey
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.responder import Responder
from guardntp.timestamps import NS_PER_S

REPO = Path(__file__).resolve().parent.parent
WALL = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=WALL)
NET = ipaddress.ip_network
#: The blocks table as version 1 made it (guardntp before the change log).
V1_SCHEMA = """
CREATE TABLE blocks (
    cidr       TEXT PRIMARY KEY,
    action     TEXT NOT NULL CHECK (action IN ('drop', 'deny')),
    reason     TEXT NOT NULL DEFAULT '',
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    origin     TEXT NOT NULL CHECK (origin IN ('manual', 'import', 'auto'))
);
CREATE INDEX blocks_by_expiry ON blocks (expires_ns);
PRAGMA user_version = 1;
"""


class RecordingPipeline(Pipeline):
    """A real pipeline that remembers what it was handed, and can refuse once."""

    def __init__(self) -> None:
        super().__init__(FilterPolicy(random_seed=1), Responder(CLOCK, WALL))
        self.calls: list[tuple[list[AclEntry], list[Network | AclEntry | NetworkKey]]] = []
        self.refuse_next = False

    def update_blocklist(self, added: Iterable[AclEntry] = (),
                         removed: Iterable[Network | AclEntry] = ()) -> None:
        added, removed = list(added), list(removed)
        if self.refuse_next:
            self.refuse_next = False
            raise MemoryError("refused by the test")
        self.calls.append((added, removed))
        super().update_blocklist(added, removed)

    def write_blocklist(self, wanted: dict[NetworkKey, BlockVerdict | None]) -> None:
        """A load's hand-over, recorded as update_blocklist's would be."""
        if self.refuse_next:
            self.refuse_next = False
            raise MemoryError("refused by the test")
        added = [AclEntry(None, verdict.action, verdict.origin, verdict.reason,
                          verdict.expires_ns, packed=packed, prefixlen=prefixlen)
                 for (packed, prefixlen), verdict in wanted.items() if verdict is not None]
        removed: list[Network | AclEntry | NetworkKey] = [
            key for key, verdict in wanted.items() if verdict is None]
        self.calls.append((added, removed))
        super().write_blocklist(wanted)

    def expire_blocklist(self, now_ns: int, max_slots: int) -> int:
        """Recorded as the removal of what the sweep took out."""
        if self.refuse_next:
            self.refuse_next = False
            raise MemoryError("refused by the test")
        before = self._networks()
        more = super().expire_blocklist(now_ns, max_slots)
        gone = before - self._networks()
        if gone:
            self.calls.append(([], sorted(gone)))
        return more

    def _networks(self) -> set[tuple[bytes, int]]:
        return {(packed, prefixlen) for packed, prefixlen, _ in self.acl.block_table.items()}


class CountingStore(BlockStore):
    """The server's store, counting how it was read: every row, or the changes."""

    full_reads = 0
    change_reads = 0

    @contextlib.contextmanager
    def read_all(self) -> Iterator[tuple[LogPosition | None, Iterator[Row]]]:
        self.full_reads += 1
        with super().read_all() as found:
            yield found

    def read_changes(self, since: LogPosition) -> Changes | None:
        self.change_reads += 1
        return super().read_changes(since)


class Clock:
    def __init__(self) -> None:
        self.wall_ns = WALL
        self.mono_ns = 5_000 * NS_PER_S

    def advance(self, seconds: float) -> None:
        self.wall_ns += int(seconds * NS_PER_S)
        self.mono_ns += int(seconds * NS_PER_S)


class Server:
    """The blocklist side of a server: its store, its LiveBlocklist, its clock."""

    def __init__(self, state: Path, clock: Clock) -> None:
        self.clock = clock
        self.pipeline = RecordingPipeline()
        self.store = CountingStore.in_state_dir(state, busy_timeout_ms=20)
        self.live = LiveBlocklist(self.store, self.pipeline, parse_auto_policy({}),
                                  wall_ns=lambda: clock.wall_ns,
                                  monotonic_ns=lambda: clock.mono_ns)
        self.live._version = self.store.data_version()
        self.live.load(clock.wall_ns)
        self.live.refresh()            # the first tick purges; out of the way

    def layer(self) -> dict[Network, AclEntry]:
        return {entry.network: entry for entry in self.pipeline.acl.blocklist_entries()}

    def handed_over(self) -> list[tuple[set[str], set[str]]]:
        """Per update since the last call: (cidrs added or replaced, cidrs removed)."""
        calls = self.pipeline.calls
        self.pipeline.calls = []
        return [({str(e.network) for e in added}, {str(network_of(n)) for n in removed})
                for added, removed in calls]


def network_of(removed: object) -> Network:
    if isinstance(removed, AclEntry):
        return removed.network
    if isinstance(removed, tuple):
        return ipaddress.ip_network(removed)
    return removed  # type: ignore[return-value]


def store_says(writer: BlockStore, now_ns: int) -> dict[Network, AclEntry]:
    """What the filter should hold: every active row, as its access-list entry."""
    return {entry.network: entry.acl_entry() for entry in writer.entries()
            if entry.active(now_ns)}


def in_step(server: Server, writer: BlockStore) -> bool:
    expected = store_says(writer, server.clock.wall_ns)
    return server.layer() == expected and server.live.active_entries == len(expected)


def entry(cidr: str, action: str = "drop", ttl_s: int | None = None, reason: str = "",
          origin: str = "manual", now_ns: int = WALL) -> BlockEntry:
    return BlockEntry(NET(cidr), action, reason, now_ns,
                      None if ttl_s is None else now_ns + ttl_s * NS_PER_S, origin)


def feed(count: int, first_octet: int = 10, ttl_s: int | None = None) -> list[BlockEntry]:
    return [entry(str(ipaddress.IPv4Network(((first_octet << 24) + (index << 8), 24))),
                  ttl_s=ttl_s, reason="feed", origin="import") for index in range(count)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[BlockStore]:
    """A second connection, as ``guardntp block`` opens one."""
    store = BlockStore.in_state_dir(tmp_path)
    store.upsert(feed(2000), WALL)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def server(tmp_path: Path, writer: BlockStore, clock: Clock) -> Iterator[Server]:
    running = Server(tmp_path, clock)
    assert running.store.full_reads == 1 and in_step(running, writer)
    running.handed_over()
    try:
        yield running
    finally:
        running.live.close()


# ---------------------------------------------------------------------------- changes

def test_an_add_reads_the_changed_row_not_every_row(server: Server, writer: BlockStore
                                                    ) -> None:
    writer.upsert([entry("198.51.100.7/32", reason="flood")], WALL)
    server.live.refresh()
    assert server.handed_over() == [({"198.51.100.7/32"}, set())]
    assert in_step(server, writer) and server.live.active_entries == 2001
    assert (server.store.full_reads, server.store.change_reads) == (1, 1)
    server.live.refresh()                  # nothing new: not even the log is read
    assert server.handed_over() == [] and server.store.change_reads == 1


def test_a_re_add_with_another_action_or_expiry_replaces_the_entry(
        server: Server, writer: BlockStore, clock: Clock) -> None:
    writer.upsert([entry("10.0.5.0/24", "deny", ttl_s=30, reason="worse")], WALL)
    server.live.refresh()
    assert server.handed_over() == [({"10.0.5.0/24"}, set())]
    held = server.layer()[NET("10.0.5.0/24")]
    assert (held.action, held.expires_ns, held.reason) == (Action.DENY, WALL + 30 * NS_PER_S,
                                                           "worse")
    # The same again, only later: the filter has it already, nothing is handed over.
    writer.upsert([replace(entry("10.0.5.0/24", "deny", ttl_s=30, reason="worse"),
                           created_ns=WALL + 1)], WALL)
    server.live.refresh()
    assert server.handed_over() == [] and server.store.change_reads == 2
    # A longer TTL replaces the shorter one: the entry outlives the first expiry.
    writer.upsert([entry("10.0.5.0/24", "deny", ttl_s=60)], WALL)
    server.live.refresh()
    assert server.handed_over() == [({"10.0.5.0/24"}, set())]
    clock.advance(31)
    server.live.refresh()
    assert server.handed_over() == [] and NET("10.0.5.0/24") in server.layer()
    clock.advance(30)
    server.live.refresh()                  # lapsed: removed without a row read
    assert server.handed_over() == [(set(), {"10.0.5.0/24"})]
    assert server.store.change_reads == 3 and in_step(server, writer)


def test_a_remove_takes_the_entry_out(server: Server, writer: BlockStore) -> None:
    assert writer.remove(NET("10.0.7.0/24"), WALL)
    server.live.refresh()
    assert server.handed_over() == [(set(), {"10.0.7.0/24"})]
    assert in_step(server, writer) and server.live.active_entries == 1999
    assert server.pipeline.acl.lookup(bytes((10, 0, 7, 1)), WALL) is None


def test_an_import_of_many_is_one_update(server: Server, writer: BlockStore) -> None:
    """``block import --replace``: every imported row deleted and written again, in one
    transaction. Only what differs reaches the filter, in one step."""
    kept = feed(1500)                                 # the first 1500 stay as they are
    new = feed(3000, first_octet=11)
    writer.upsert([*kept, *new], WALL + 1, replace_origin="import")
    server.live.refresh()
    [(added, removed)] = server.handed_over()
    assert added == {e.cidr for e in new}
    assert removed == {e.cidr for e in feed(2000)[1500:]}
    assert in_step(server, writer) and server.live.active_entries == 4500
    assert server.store.full_reads == 1


def test_purged_rows_leave_the_filter_once(server: Server, writer: BlockStore,
                                           clock: Clock) -> None:
    # Re-added with a TTL that runs out before the server looks: the changed row is
    # there, but lapsed; the entry goes.
    writer.upsert([entry("10.0.3.0/24", ttl_s=1)], WALL)
    clock.advance(2)
    server.live.refresh()
    assert server.handed_over() == [(set(), {"10.0.3.0/24"})]
    assert in_step(server, writer)
    writer.upsert([entry("192.0.2.0/24", ttl_s=5, now_ns=clock.wall_ns),
                   entry("192.0.2.128/25", ttl_s=10, now_ns=clock.wall_ns)], clock.wall_ns)
    server.live.refresh()
    assert server.handed_over() == [({"192.0.2.0/24", "192.0.2.128/25"}, set())]
    # The first lapses while the server looks: its own heap removes it.
    clock.advance(6)
    server.live.refresh()
    assert server.handed_over() == [(set(), {"192.0.2.0/24"})]
    # The second lapses unseen, and another connection purges both rows before the
    # server's next tick: the log names both, the filter loses the one it still has.
    clock.advance(5)
    assert writer.purge_expired(clock.wall_ns) == 2
    server.live.refresh()
    assert server.handed_over() == [(set(), {"192.0.2.128/25"})]
    assert in_step(server, writer) and server.live.active_entries == 1999


# ---------------------------------------------------------------------------- whole reads

def test_a_trimmed_log_makes_the_server_read_every_row(server: Server, writer: BlockStore
                                                       ) -> None:
    writer.keep_changes = 10
    for index in range(15):                 # 15 changes; the log keeps the last 10
        writer.upsert([entry(f"198.51.100.{index}/32")], WALL)
    assert writer.db.execute("SELECT count(*) FROM changes").fetchone()[0] == 10
    writer.remove(NET("10.0.0.0/24"), WALL)
    assert writer.db.execute("SELECT count(*) FROM changes").fetchone()[0] == 10
    server.live.refresh()
    assert (server.store.full_reads, server.store.change_reads) == (2, 1)
    [(added, removed)] = server.handed_over()
    assert len(added) == 15 and removed == {"10.0.0.0/24"}
    assert in_step(server, writer)
    # Back on the log at once: the next change is read as a change.
    writer.upsert([entry("203.0.113.0/24")], WALL)
    server.live.refresh()
    assert server.handed_over() == [({"203.0.113.0/24"}, set())]
    assert (server.store.full_reads, server.store.change_reads) == (2, 2)


def test_a_replaced_file_is_read_whole(tmp_path: Path, server: Server, writer: BlockStore
                                       ) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / (FILENAME + suffix)
        if path.exists():
            path.rename(tmp_path / ("old-" + FILENAME + suffix))
    fresh = BlockStore.in_state_dir(tmp_path)
    try:
        fresh.upsert([*feed(10), entry("203.0.113.0/24", "deny")], WALL)
        server.live.refresh()
        [(added, removed)] = server.handed_over()
        assert added == {"203.0.113.0/24"} and len(removed) == 1990
        assert in_step(server, fresh)
        # The new file's own log from here on.
        fresh.remove(NET("10.0.1.0/24"), WALL)
        server.live.refresh()
        assert server.handed_over() == [(set(), {"10.0.1.0/24"})]
        assert in_step(server, fresh) and server.live.last_error == ""
    finally:
        fresh.close()


@pytest.fixture
def upgraded(tmp_path: Path, clock: Clock) -> Iterator[tuple[Server, BlockStore]]:
    """A server on a file of the previous version: upgraded on open, its log empty
    (the server stands at seq 0, with no change whose token it could check)."""
    make_v1_store(tmp_path / FILENAME, 100)
    running = Server(tmp_path, clock)
    assert running.live._position is not None and running.live._position.seq == 0
    running.handed_over()
    store = BlockStore.in_state_dir(tmp_path)
    try:
        yield running, store
    finally:
        store.close()
        running.live.close()


def test_another_file_restored_at_seq_0_is_read_whole(
        tmp_path: Path, upgraded: tuple[Server, BlockStore]) -> None:
    """Only the log's id tells the two logs apart here: the other file's is complete."""
    server, writer = upgraded
    other = BlockStore(tmp_path / "other.sqlite3")
    try:
        other.upsert([entry("192.0.2.0/24"), entry("198.51.100.0/24")], WALL)
        other.db.backup(writer.db)
        server.live.refresh()
        [(added, removed)] = server.handed_over()
        assert added == {"192.0.2.0/24", "198.51.100.0/24"} and len(removed) == 100
        assert in_step(server, writer)
    finally:
        other.close()


def test_a_log_trimmed_past_seq_0_is_read_whole(upgraded: tuple[Server, BlockStore]) -> None:
    """Trimmed before the server looked: only counting tells (no token at seq 0)."""
    server, writer = upgraded
    writer.keep_changes = 10
    for index in range(15):
        writer.upsert([entry(f"198.51.100.{index}/32")], WALL)
    server.live.refresh()
    [(added, removed)] = server.handed_over()
    assert len(added) == 15 and removed == set()
    assert in_step(server, writer) and server.store.full_reads == 2


def test_a_log_missing_changes_in_the_middle_is_not_trusted(server: Server,
                                                             writer: BlockStore) -> None:
    """Rows deleted from the middle of the log (by hand): the count gives it away."""
    writer.upsert([entry("198.51.100.0/24")], WALL)
    writer.remove(NET("10.0.1.0/24"), WALL)
    writer.upsert([entry("203.0.113.0/24")], WALL)
    writer.db.execute("DELETE FROM changes WHERE cidr = '10.0.1.0/24'")
    server.live.refresh()
    [(added, removed)] = server.handed_over()
    assert added == {"198.51.100.0/24", "203.0.113.0/24"} and removed == {"10.0.1.0/24"}
    assert in_step(server, writer) and server.store.full_reads == 2


def test_a_file_restored_in_place_is_read_whole(tmp_path: Path, server: Server,
                                                writer: BlockStore) -> None:
    """Another file's pages copied into this one (``sqlite3 ... .restore``): the same
    inode, but another log, whose seqs say nothing of what this server saw."""
    other = BlockStore(tmp_path / "other.sqlite3")
    try:
        # Further along in its own log than the server is in this one's, and complete
        # (the change at the server's seq, another one, gives it away).
        other.upsert(feed(2000, first_octet=20), WALL)
        other.upsert([entry(f"192.0.2.{index}/32") for index in range(50)], WALL)
        other.db.backup(writer.db)
        server.live.refresh()
        [(added, removed)] = server.handed_over()
        assert len(added) == 2050 and len(removed) == 2000
        assert in_step(server, writer) and server.store.full_reads == 2
    finally:
        other.close()


@pytest.mark.parametrize("writes_after", [0, 1, 2])
def test_an_older_copy_put_back_is_read_whole(tmp_path: Path, server: Server,
                                              writer: BlockStore, writes_after: int) -> None:
    """An older copy of the same file put back in place: its log is this one's, its
    seq behind what the server has seen, or (after a write or two before the server's
    next tick) level with it or past it, with other changes at those seqs."""
    backup = BlockStore(tmp_path / "backup.sqlite3")
    try:
        writer.db.backup(backup.db)
        writer.upsert([entry("198.51.100.0/24")], WALL)
        server.live.refresh()
        assert server.handed_over() == [({"198.51.100.0/24"}, set())]
        backup.db.backup(writer.db)
        for index in range(writes_after):
            writer.upsert([entry(f"203.0.113.{index}/32")], WALL)
        server.live.refresh()
        [(added, removed)] = server.handed_over()
        assert removed == {"198.51.100.0/24"} and len(added) == writes_after
        assert in_step(server, writer) and server.store.full_reads == 2
    finally:
        backup.close()


def test_a_dropped_trigger_is_noticed_and_every_row_read(server: Server,
                                                         writer: BlockStore) -> None:
    """Someone drops a trigger: the log no longer logs, so it must not be trusted."""
    writer.db.execute("DROP TRIGGER blocks_log_insert")
    writer.db.execute("INSERT INTO blocks VALUES ('198.51.100.0/24', 'deny', '', 0, NULL, "
                      "'manual')")
    server.live.refresh()
    assert server.handed_over() == [({"198.51.100.0/24"}, set())]
    assert in_step(server, writer) and server.store.full_reads == 2


# ---------------------------------------------------------------------------- old files

def make_v1_store(path: Path, rows: int) -> None:
    """A blocklist as guardntp made it before the change log."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(V1_SCHEMA)
        db.executemany("INSERT INTO blocks VALUES (?, 'drop', 'old', 0, NULL, 'manual')",
                       [(f"10.0.{index}.0/24",) for index in range(rows)])
    path.chmod(0o600)


def test_a_store_of_the_previous_version_is_upgraded_on_open(tmp_path: Path, clock: Clock
                                                             ) -> None:
    make_v1_store(tmp_path / FILENAME, 100)
    server = Server(tmp_path, clock)
    try:
        assert server.store.tracking and server.store.tracking_problem == ""
        assert server.store.db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert server.live.active_entries == 100
        # A writer that knows nothing of the log (the old CLI, the sqlite3 shell) is
        # logged all the same: the triggers are in the file.
        with sqlite3.connect(tmp_path / FILENAME) as old:
            old.execute("INSERT INTO blocks VALUES ('198.51.100.0/24', 'deny', '', 0, NULL, "
                        "'manual')")
            old.execute("DELETE FROM blocks WHERE cidr = '10.0.3.0/24'")
            old.execute("UPDATE blocks SET action = 'deny' WHERE cidr = '10.0.4.0/24'")
        server.live.refresh()
        [(added, removed)] = server.handed_over()[1:]      # after the first load's
        assert added == {"198.51.100.0/24", "10.0.4.0/24"} and removed == {"10.0.3.0/24"}
        assert (server.store.full_reads, server.store.change_reads) == (1, 1)
        # Opening it again changes nothing more.
        again = BlockStore.in_state_dir(tmp_path)
        with again.read_all() as (position, _):
            assert again.tracking and position == server.live._position
        again.close()
    finally:
        server.live.close()


READ_ONLY_SERVER = textwrap.dedent("""
    import json, logging, os, sys
    from pathlib import Path
    from guardntp.blocklist.auto import parse_auto_policy
    from guardntp.blocklist.entries import BlockEntry, parse_cidr
    from guardntp.blocklist.live import setup_blocklist
    from guardntp.clock import ClockState
    from guardntp.filter.pipeline import Pipeline
    from guardntp.filter.policy import FilterPolicy
    from guardntp.responder import Responder
    if os.geteuid() == 0:     # root writes anything: be the server's user
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    warnings = []
    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append((record.getMessage(), record.exc_info is not None))
    logging.getLogger("guardntp.blocklist").addHandler(Keep(logging.WARNING))
    clock = ClockState(True, 2, b"GPS\\0", -20, 0, 0, 0)
    pipeline = Pipeline(FilterPolicy(), Responder(clock, 0))
    class Timers:
        def add_periodic(self, interval_s, callback): pass
    live = setup_blocklist(Path(sys.argv[1]), pipeline, Timers(), parse_auto_policy({}))
    def report():
        print(json.dumps({"active": live.active_entries, "tracking": live.store.tracking,
                          "warnings": warnings, "error": live.last_error,
                          "blocked": sorted(str(e.network)
                                            for e in pipeline.acl.blocklist_entries())}),
              flush=True)
    report()
    sys.stdin.readline()       # the test writes meanwhile
    # An automatic block waiting to be written (it cannot be): the reads go on.
    live._pending_auto[b"test"] = BlockEntry(parse_cidr("127.0.0.1"), origin="auto")
    live.refresh()
    live.refresh()
    report()
""")


def test_a_read_only_store_of_the_previous_version_is_read_whole(shared_dir: Path) -> None:
    """The server's user may only read the file (root's, say, or made 0400): it cannot
    be given a change log. It is read whole on every change, after one warning."""
    state = shared_dir / "state"
    state.mkdir(mode=0o700)
    make_v1_store(state / FILENAME, 3)
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)
        os.chown(state / FILENAME, 65534, 65534)
    (state / FILENAME).chmod(0o400)
    child = subprocess.Popen([sys.executable, "-c", READ_ONLY_SERVER, str(state)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        first = json.loads(child.stdout.readline() or "{}")
        assert first["active"] == 3 and first["tracking"] is False, child.stderr
        [(warning, traceback)] = first["warnings"]
        assert "cannot add a change log" in warning and "readonly" in warning
        assert "is read-only for this user" in warning
        assert "\n" not in warning and not traceback and first["error"] == ""
        # An older guardntp, as root, writes to it meanwhile.
        (state / FILENAME).chmod(0o600)
        with sqlite3.connect(state / FILENAME) as old:
            old.execute("INSERT INTO blocks VALUES ('198.51.100.0/24', 'drop', '', 0, NULL, "
                        "'manual')")
            old.execute("DELETE FROM blocks WHERE cidr = '10.0.0.0/24'")
        (state / FILENAME).chmod(0o400)
        child.stdin.write("go\n")
        child.stdin.flush()
        second = json.loads(child.stdout.readline() or "{}")
        assert second["blocked"] == ["10.0.1.0/24", "10.0.2.0/24", "198.51.100.0/24"], second
        assert len(second["warnings"]) == 1 and second["error"] == ""   # once, not per tick
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "Traceback" not in (child.stderr.read() if child.stderr else "")


# ---------------------------------------------------------------------------- writers

INTERLEAVED_WRITER = textwrap.dedent("""
    import ipaddress, random, sys, time
    from pathlib import Path
    from guardntp.blocklist.entries import BlockEntry
    from guardntp.blocklist.store import BlockStore
    state = Path(sys.argv[1])
    seed, count, keep = (int(argument) for argument in sys.argv[2:5])
    rng = random.Random(seed)
    store = BlockStore.in_state_dir(state)
    store.keep_changes = keep   # small: a slow reader may have to read it whole
    deadline = time.monotonic() + 20
    while not (state / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    now = 1_800_000_000 * 10**9
    for _ in range(count):
        # Both writers share these 40 networks: they overwrite each other's rows.
        network = ipaddress.IPv4Network((192 << 24 | rng.randrange(40) << 8, 24))
        if rng.random() < 0.3:
            store.remove(network, now)
        else:
            many = [BlockEntry(network, rng.choice(["drop", "deny"]), f"writer {seed}",
                               now, None, "manual")]
            if rng.random() < 0.1:    # now and then an import of a few
                many += [BlockEntry(ipaddress.IPv4Network((193 << 24 | seed << 16 | i << 8,
                                                           24)), "drop", "", now, None,
                                    "import") for i in range(rng.randrange(1, 30))]
            store.upsert(many, now)
    print("done")
""")


@pytest.mark.parametrize("trimmed", [False, True], ids=["by-the-log", "log-trimmed"])
def test_two_writers_interleaved_end_in_step(tmp_path: Path, server: Server,
                                             writer: BlockStore, trimmed: bool) -> None:
    """Two processes write (overlapping networks, removals, small imports) while the
    server ticks; at the end the filter holds exactly what the store says. By the log
    alone, or (``log-trimmed``: the writers keep 20 changes, the server is slow now
    and then) mixed with whole reads."""
    count = 300
    keep = 20 if trimmed else 100_000
    writers = [subprocess.Popen([sys.executable, "-c", INTERLEAVED_WRITER, str(tmp_path),
                                 str(seed), str(count), str(keep)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for seed in (1, 2)]
    try:
        time.sleep(0.5)
        (tmp_path / "go").touch()
        ticks = 0
        while any(w.poll() is None for w in writers) and ticks < 20_000:
            server.live.refresh()
            ticks += 1
            # Now and then a slow tick, for the log to be trimmed past the server.
            time.sleep(0.05 if trimmed and ticks % 10 == 0 else 0.002)
        for w in writers:
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    server.live.refresh()
    assert server.live.last_error == ""
    assert in_step(server, writer)
    if trimmed:
        # Both ways were taken: the log, and every row where it was trimmed past the
        # server (how often each, the scheduler decides).
        assert server.store.change_reads > 1
    else:
        assert server.store.full_reads == 1 and server.store.change_reads > 10


# ---------------------------------------------------------------------------- failures

def test_a_failed_apply_leaves_the_filter_as_it_was_and_is_retried(
        server: Server, writer: BlockStore) -> None:
    before = server.layer()
    generation = server.pipeline.acl.generation
    writer.upsert([entry("198.51.100.0/24")], WALL)
    writer.remove(NET("10.0.9.0/24"), WALL)
    server.pipeline.refuse_next = True
    with pytest.raises(MemoryError):
        server.live.refresh()
    assert server.layer() == before and server.pipeline.acl.generation == generation
    assert server.live.active_entries == 2000
    server.live.refresh()                  # the same change, read again, goes in whole
    assert server.handed_over() == [({"198.51.100.0/24"}, {"10.0.9.0/24"})]
    assert in_step(server, writer)


def test_a_failed_expiry_is_retried(server: Server, writer: BlockStore, clock: Clock) -> None:
    writer.upsert([entry("198.51.100.0/24", ttl_s=1)], WALL)
    server.live.refresh()
    server.handed_over()
    clock.advance(2)
    server.pipeline.refuse_next = True
    with pytest.raises(MemoryError):
        server.live.refresh()
    assert NET("198.51.100.0/24") in server.layer()
    server.live.refresh()
    assert server.handed_over() == [(set(), {"198.51.100.0/24"})]
    assert server.live.active_entries == 2000


def test_bad_rows_and_a_missing_table_are_one_line_warnings(
        tmp_path: Path, server: Server, writer: BlockStore,
        caplog: pytest.LogCaptureFixture) -> None:
    before = server.layer()
    caplog.set_level(logging.WARNING, "guardntp.blocklist")
    # What a foreign writer can put there (the CHECKs switched off, for the action).
    writer.db.execute("PRAGMA ignore_check_constraints = ON")
    bad_rows = [("198.51.100.0/24", "drop", "", 0, "soon", "manual"),
                ("198.51.100.0/24", "block", "", 0, None, "manual"),
                ("198.51.100.1/24", "drop", "", 0, None, "manual"),
                ("198.51.100.0/24", "drop", "", 0, 1.5, "manual"),
                ("198.51.100.0/24", "drop", b"\xff", 0, None, "manual")]   # a blob
    for bad in bad_rows:
        # With a good change in the same batch, which must wait for it.
        writer.db.execute("INSERT INTO blocks VALUES ('203.0.113.0/24', 'drop', '', 0, NULL, "
                          "'manual')")
        writer.db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?)", bad)
        for _ in range(3):
            server.live.refresh()
        assert server.layer() == before and server.handed_over() == []
        writer.db.execute("DELETE FROM blocks WHERE cidr IN (?, '203.0.113.0/24')", bad[:1])
        server.live.refresh()
        assert server.handed_over() == [] and server.live.last_error == ""
    assert in_step(server, writer)
    # Each bad row said once, in one line, without a traceback.
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[1].split(");")[0] for m in messages] == [
        "expires_ns 'soon' is not an integer",
        "unknown action 'block'",
        "198.51.100.1/24 has host bits set",
        "expires_ns 1.5 is not an integer",
        "reason and origin must be text"], messages
    assert all("\n" not in m and "cannot be applied" in m for m in messages)
    assert not any(r.exc_info for r in caplog.records)
    caplog.clear()
    # The table itself dropped: a warning, retried, the entries applied stay in force.
    writer.db.execute("DROP TABLE blocks")
    server.live.refresh()
    server.live.refresh()
    assert [r.getMessage() for r in caplog.records] == [
        f"blocklist: {tmp_path / FILENAME}: no such table: blocks (retrying)"]
    assert server.layer() == before


def test_a_locked_file_is_a_retried_warning_and_changes_still_apply(
        tmp_path: Path, server: Server, writer: BlockStore, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    """An import holds the write lock: the server's own write (its purge, due now)
    gives up after its 20 ms with one warning, to be tried at the next purge; reading
    the log is not locked out (WAL), so the change applies all the same."""
    caplog.set_level(logging.WARNING, "guardntp.blocklist")
    writer.upsert([entry("198.51.100.0/24")], WALL)
    importer = BlockStore.in_state_dir(tmp_path)
    try:
        importer.db.execute("BEGIN IMMEDIATE")
        clock.advance(61)                        # the server's purge is due
        server.live.refresh()
        server.live.refresh()
        assert server.handed_over() == [({"198.51.100.0/24"}, set())]
        [record] = caplog.records
        assert record.getMessage().endswith("database is locked (retrying)")
        assert not record.exc_info
        importer.db.execute("COMMIT")
        server.live.refresh()
        assert server.live.last_error == "" and in_step(server, writer)
    finally:
        importer.close()


def test_a_garbage_file_in_its_place_is_a_retried_warning(
        tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture) -> None:
    before = server.layer()
    caplog.set_level(logging.WARNING, "guardntp.blocklist")
    for suffix in ("-wal", "-shm"):     # moved away with it, or SQLite reads them
        (tmp_path / (FILENAME + suffix)).rename(tmp_path / ("old" + suffix))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a database" * 200)
    garbage.chmod(0o600)
    garbage.rename(tmp_path / FILENAME)
    server.live.refresh()
    server.live.refresh()
    [record] = caplog.records
    assert "file is not a database (retrying)" in record.getMessage()
    assert not record.exc_info and server.layer() == before
