"""The NTS master key file: rotation, sharing between servers, safe file handling."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guardntp.nts.cookies import (
    CookieContents,
    KeyStore,
    KeyStoreError,
    make_cookie,
    open_cookie,
)
from guardntp.statedir import StateDirError

DAY = 86_400
CONTENTS = CookieContents(15, b"c" * 32, b"s" * 32)


def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


def test_first_load_creates_a_0600_key_file(tmp_path: Path) -> None:
    store = KeyStore(state(tmp_path))
    keys = store.refresh(1_000_000)
    info = os.lstat(store.path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert len(keys.by_id) == 1 and keys.current.created_s == 1_000_000
    assert not [name for name in os.listdir(store.state_dir) if name.endswith(".tmp")]
    assert store.refresh(1_000_010) is keys  # nothing changed: the same object


def test_daily_rotation_keeps_old_cookies_working(tmp_path: Path) -> None:
    store = KeyStore(state(tmp_path))
    t0 = 1_000_000
    cookie = make_cookie(store.refresh(t0), CONTENTS, b"n" * 16)
    one = store.refresh(t0 + DAY)
    assert one.current.created_s == t0 + DAY and len(one.by_id) == 2
    assert open_cookie(one, cookie) == CONTENTS
    two = store.refresh(t0 + 2 * DAY)
    assert open_cookie(two, cookie) == CONTENTS and len(two.by_id) == 3
    three = store.refresh(t0 + 3 * DAY)
    assert len(three.by_id) == 3
    with pytest.raises(ValueError, match="unknown_key"):
        open_cookie(three, cookie)
    assert store.rotations == 4


def test_two_servers_share_the_file(tmp_path: Path) -> None:
    directory = state(tmp_path)
    a = KeyStore(directory)
    b = KeyStore(directory)
    reader = KeyStore(directory, rotate=False)
    t0 = 2_000_000
    keys_a = a.refresh(t0)
    assert b.refresh(t0 + 5).current == keys_a.current  # b adopts a's key, no new one
    cookie = make_cookie(keys_a, CONTENTS, b"n" * 16)
    assert open_cookie(reader.refresh(t0 + 6), cookie) == CONTENTS
    # b rotates; a and the reader pick the new key up from the file
    rotated = b.refresh(t0 + DAY)
    assert a.refresh(t0 + DAY + 1).current == rotated.current
    assert reader.refresh(t0 + DAY + 2).current == rotated.current
    assert open_cookie(reader.keys, cookie) == CONTENTS


def test_a_reader_without_a_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="no NTS master key"):
        KeyStore(state(tmp_path), rotate=False).refresh(0)


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    directory = state(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, directory / "nts-keys")
    with pytest.raises(StateDirError, match="symbolic link"):
        KeyStore(directory).refresh(0)
    assert victim.read_text() == "precious\n"
    assert os.path.islink(directory / "nts-keys")


def test_a_planted_symlink_as_lock_file_is_refused(tmp_path: Path) -> None:
    directory = state(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, directory / "nts-keys.lock")
    with pytest.raises(StateDirError, match="symbolic link"):
        KeyStore(directory).refresh(0)
    assert victim.read_text() == "precious\n"


def test_a_hard_linked_key_file_is_refused(tmp_path: Path) -> None:
    directory = state(tmp_path)
    store = KeyStore(directory)
    store.refresh(0)
    os.link(store.path, tmp_path / "elsewhere")
    with pytest.raises(StateDirError, match="hard links"):
        KeyStore(directory).refresh(1)


def test_writing_replaces_a_symlink_swapped_in_after_reading(tmp_path: Path) -> None:
    # The new file goes to a fresh temporary name (O_EXCL | O_NOFOLLOW) and is renamed
    # over the name: a symlink planted there meanwhile is replaced, its target untouched.
    directory = state(tmp_path)
    store = KeyStore(directory)
    store.refresh(0)
    keys = store._read()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.unlink(store.path)
    os.symlink(victim, store.path)
    store._write(keys)
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(store.path)
    assert KeyStore(directory, rotate=False).refresh(1).current == store.keys.current


def test_a_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    store = KeyStore(state(tmp_path))
    store.refresh(0)
    os.chmod(store.path, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        KeyStore(store.state_dir).refresh(1)


def test_a_broken_key_file_names_its_line(tmp_path: Path) -> None:
    directory = state(tmp_path)
    path = directory / "nts-keys"
    path.write_text("# comment\n0000000a 5 zz\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyStoreError, match=r"nts-keys:2: expected"):
        KeyStore(directory).refresh(10)


def test_a_group_writable_state_dir_is_refused(tmp_path: Path) -> None:
    directory = state(tmp_path)
    os.chmod(directory, 0o770)
    with pytest.raises(StateDirError, match="writable by its group"):
        KeyStore(directory).refresh(0)


def test_bad_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="at least 60 s"):
        KeyStore(tmp_path, period_s=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files over")
def test_root_hands_the_files_to_the_state_dirs_owner(tmp_path: Path) -> None:
    # As `guardntp serve --user guardntp` does: root prepares, the service user reads.
    directory = state(tmp_path)
    os.chown(directory, 65534, 65534)
    store = KeyStore(directory)
    store.refresh(0)
    for name in ("nts-keys", "nts-keys.lock"):
        info = os.lstat(directory / name)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o600)
