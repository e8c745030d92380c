"""The state directory cannot be turned against root.

The documented setup gives the state directory to the service user (``--user
guardntp``), so that user controls every name inside it. Each test here plants
what such a user could plant (a symlink or a hard link where the blocklist or its
side files go, or a symlink instead of the directory) and then runs what root
runs (``guardntp block ...``, the store the server opens, the hand-over before the
privilege drop): nothing outside the directory may be created, written or given
away, and the operator gets one line saying why.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_guardntp_as_nobody

from guardntp.blocklist.entries import BlockEntry, parse_cidr
from guardntp.blocklist.store import FILENAME, BlockStore, StoreError
from guardntp.privileges import PrivilegeError, chown_for, resolve_identity
from guardntp.statedir import (
    StateDirError,
    check_state_file,
    hand_over_fd,
    open_state_file,
    prepare_state_dir,
)

SERVICE_UID = SERVICE_GID = 65534  # nobody plays the service user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def service_dir(parent: Path, name: str = "state") -> Path:
    """A state directory as documented: mode 0750, owned by the service user."""
    path = parent / name
    path.mkdir(mode=0o750)
    if os.geteuid() == 0:
        os.chown(path, SERVICE_UID, SERVICE_GID)
    return path


def root_file(path: Path, content: bytes = b"") -> Path:
    """A file only its owner (root, in CI) may read or write."""
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def fingerprint(path: Path) -> tuple[int, int, int, bytes]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), path.read_bytes()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardntp", *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def entry(cidr: str = "192.0.2.1") -> BlockEntry:
    now = time.time_ns()
    return BlockEntry(parse_cidr(cidr), "drop", "test", now, None, "manual")


# ---------------------------------------------------------------------------- the database


def test_a_planted_symlink_creates_nothing(tmp_path: Path) -> None:
    state = service_dir(tmp_path)
    victim = tmp_path / "victim"
    (state / FILENAME).symlink_to(victim)

    with pytest.raises(StoreError, match="symbolic link"):
        BlockStore.in_state_dir(state)
    assert not victim.exists()

    result = cli("block", "add", "192.0.2.1", "--state-dir", str(state))
    assert_one_line_failure(result, FILENAME, "symbolic link")
    assert not victim.exists()
    assert (state / FILENAME).is_symlink()  # left for the operator to look at


@needs_root
def test_a_planted_symlink_does_not_hand_over_roots_file(tmp_path: Path) -> None:
    # An empty file is the worst case: SQLite takes it for an empty database.
    victim = root_file(tmp_path / "victim")
    before = fingerprint(victim)
    state = service_dir(tmp_path)
    (state / FILENAME).symlink_to(victim)

    with pytest.raises(StoreError, match="symbolic link"):
        BlockStore.in_state_dir(state)
    assert_one_line_failure(cli("block", "add", "192.0.2.1", "--state-dir", str(state)),
                            "symbolic link")
    assert fingerprint(victim) == before


@needs_root
def test_a_planted_hard_link_is_refused(tmp_path: Path) -> None:
    victim = root_file(tmp_path / "victim")
    before = fingerprint(victim)
    state = service_dir(tmp_path)
    os.link(victim, state / FILENAME)

    with pytest.raises(StoreError, match="hard link"):
        BlockStore.in_state_dir(state)
    assert_one_line_failure(cli("block", "add", "192.0.2.1", "--state-dir", str(state)),
                            "hard link")
    assert fingerprint(victim) == before


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_planted_side_file_symlink_is_refused_by_name(tmp_path: Path, suffix: str) -> None:
    state = service_dir(tmp_path)
    BlockStore.in_state_dir(state).close()  # a real blocklist; closing removes -wal, -shm
    victim = root_file(tmp_path / "victim", b"precious")
    before = fingerprint(victim)
    (state / (FILENAME + suffix)).symlink_to(victim)

    with pytest.raises(StoreError, match=f"{FILENAME}{suffix} is a symbolic link"):
        BlockStore.in_state_dir(state)
    assert_one_line_failure(cli("block", "add", "192.0.2.1", "--state-dir", str(state)),
                            FILENAME + suffix, "symbolic link")
    assert fingerprint(victim) == before


@needs_root
@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_planted_side_file_hard_link_is_not_written(tmp_path: Path, suffix: str) -> None:
    state = service_dir(tmp_path)
    BlockStore.in_state_dir(state).close()
    victim = root_file(tmp_path / "victim", b"precious" * 1000)
    before = fingerprint(victim)
    os.link(victim, state / (FILENAME + suffix))

    with pytest.raises(StoreError, match="hard link"):
        store = BlockStore.in_state_dir(state)
        try:
            store.upsert([entry()], time.time_ns())
        finally:
            store.close()
    assert fingerprint(victim) == before


@needs_root
def test_hand_over_never_follows_a_side_file_swapped_for_a_symlink(tmp_path: Path) -> None:
    victim = root_file(tmp_path / "victim")
    before = fingerprint(victim)
    state = tmp_path / "state"
    store = BlockStore.in_state_dir(state)  # root's own directory, as `serve` makes it
    try:
        shm = state / (FILENAME + "-shm")
        assert shm.exists()
        shm.unlink()
        shm.symlink_to(victim)  # what the service user could do in its own directory
        with pytest.raises(StoreError, match="symbolic link"):
            store.hand_over(SERVICE_UID, SERVICE_GID)
    finally:
        store.close()
    assert fingerprint(victim) == before
    assert (state / FILENAME).stat().st_uid == SERVICE_UID  # the real file was handed over


@needs_root
def test_root_hands_what_it_creates_to_the_directory_owner(tmp_path: Path) -> None:
    state = service_dir(tmp_path)
    store = BlockStore.in_state_dir(state)
    try:
        store.upsert([entry()], time.time_ns())
        for name in (FILENAME, FILENAME + "-wal", FILENAME + "-shm"):
            info = (state / name).stat()
            assert (info.st_uid, info.st_gid) == (SERVICE_UID, SERVICE_GID), name
            assert stat.S_IMODE(info.st_mode) == 0o600, name
    finally:
        store.close()


def test_a_new_blocklist_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = BlockStore.in_state_dir(state)
    try:
        store.upsert([entry()], time.time_ns())
        for name in (FILENAME, FILENAME + "-wal", FILENAME + "-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        store.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o750


def test_an_old_world_readable_blocklist_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    BlockStore.in_state_dir(state).close()
    (state / FILENAME).chmod(0o644)   # as guardntp made it before
    BlockStore.in_state_dir(state).close()
    assert stat.S_IMODE((state / FILENAME).stat().st_mode) == 0o600


WRITE_AND_CLOSE = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("INSERT INTO blocks VALUES ('198.51.100.0/24', 'drop', '', ?, NULL, 'manual')",
           (time.time_ns(),))
db.close()
"""


def test_the_checks_keep_the_locks_sqlite_holds(tmp_path: Path) -> None:
    """Closing any ordinary descriptor of a file drops every fcntl lock the process
    holds on it, SQLite's too: then another process, closing, takes itself for the
    last user and deletes the WAL under a live connection."""
    state = tmp_path / "state"
    store = BlockStore.in_state_dir(state)
    try:
        store.upsert([entry()], time.time_ns())
        store.hand_over(os.geteuid(), os.getegid())
        BlockStore.in_state_dir(state).close()  # a second store in the same process
        subprocess.run([sys.executable, "-c", WRITE_AND_CLOSE, str(state / FILENAME)],
                       check=True, timeout=30)
        assert (state / (FILENAME + "-wal")).exists()
        assert {e.cidr for e in store.entries()} == {"192.0.2.1/32", "198.51.100.0/24"}
    finally:
        store.close()


# ---------------------------------------------------------------------------- the directory


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    real = service_dir(tmp_path, "real")
    link = tmp_path / "link"
    link.symlink_to(real)

    with pytest.raises(StoreError, match="symbolic link"):
        BlockStore.in_state_dir(link)
    for argv in (["add", "192.0.2.1"], ["list"], ["export"]):
        result = cli("block", *argv, "--state-dir", str(link))
        assert_one_line_failure(result, str(link), "symbolic link")
    assert list(real.iterdir()) == []


def test_a_missing_directory_is_made_only_when_asked(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "state"
    with pytest.raises(StateDirError, match="does not exist"):
        prepare_state_dir(missing, create=False)
    assert not (tmp_path / "a").exists()
    assert prepare_state_dir(missing) == missing
    assert stat.S_IMODE(missing.stat().st_mode) == 0o750


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    state = service_dir(tmp_path)
    state.chmod(mode)
    with pytest.raises(StateDirError, match="writable by its group or by others"):
        prepare_state_dir(state)
    with pytest.raises(StoreError, match="writable by its group or by others"):
        BlockStore.in_state_dir(state)


def test_a_file_is_not_a_state_directory(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(StateDirError, match="not a directory"):
        prepare_state_dir(tmp_path / "state")


@needs_root
def test_a_user_refuses_a_directory_of_another_user(shared_dir: Path) -> None:
    state = shared_dir / "state"
    state.mkdir(mode=0o755)
    os.chown(state, 4242, 4242)
    result = run_guardntp_as_nobody(["block", "list", "--state-dir", str(state)])
    assert_one_line_failure(result, str(state), "belongs to uid 4242")
    # Root may use it (the documented setup: the service user owns the directory).
    assert prepare_state_dir(state) == state


# ---------------------------------------------------------------------------- the helpers


def test_open_state_file_refuses_what_is_not_a_plain_file(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    (tmp_path / "link").symlink_to(target)
    os.link(target, tmp_path / "second")
    os.mkfifo(tmp_path / "fifo")
    for name, why in [("link", "symbolic link"), ("second", "2 hard links"),
                      ("fifo", "not a regular file")]:
        with pytest.raises(StateDirError, match=why):
            open_state_file(tmp_path / name)
        with pytest.raises(StateDirError, match=why):
            check_state_file(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        open_state_file(tmp_path / "absent")
    assert check_state_file(tmp_path / "absent") is False

    fd = open_state_file(tmp_path / "new", create=True)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        hand_over_fd(fd, os.geteuid(), os.getegid(), 0o640)
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640
    finally:
        os.close(fd)
    assert check_state_file(tmp_path / "new") is True


@needs_root
def test_chown_for_does_not_follow_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PrivilegeError, match="symbolic link"):
        chown_for(str(link), resolve_identity("nobody"))
    assert real.stat().st_uid == 0
    chown_for(str(real), resolve_identity("nobody"))
    assert real.stat().st_uid == SERVICE_UID


def test_sqlite_opens_the_file_that_was_checked(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap between the check and SQLite's own open is caught before any write."""
    state = service_dir(tmp_path)
    BlockStore.in_state_dir(state).close()
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE precious (x)")
    before = other.read_bytes()
    connect = sqlite3.connect

    def swapping_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        # The service user wins the race: the name points elsewhere while SQLite opens.
        path = state / FILENAME
        path.rename(state / "aside")
        path.symlink_to(other)
        try:
            return connect(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            path.unlink()
            (state / "aside").rename(path)

    monkeypatch.setattr(sqlite3, "connect", swapping_connect)
    with pytest.raises(StoreError, match="changed while it was being opened"):
        BlockStore.in_state_dir(state)
    assert other.read_bytes() == before
