"""``guardntp block ...`` end to end through ``cli.main``, and the store under stress."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from guardntp.blocklist.store import FILENAME
from guardntp.cli import main

REPO = Path(__file__).resolve().parent.parent


def block(state: Path, *args: str) -> int:
    return main(["block", args[0], "--state-dir", str(state), *args[1:]])


def listed(state: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    capsys.readouterr()
    assert block(state, "list", "--json", *extra) == 0
    return list(json.loads(capsys.readouterr().out))


def rows(state: Path) -> int:
    with sqlite3.connect(state / FILENAME) as db:
        return int(db.execute("SELECT count(*) FROM blocks").fetchone()[0])


# ---------------------------------------------------------------------------- round trips

def test_add_list_update_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24", "--ttl", "1h", "--reason", "flood at 3am") == 0
    assert "blocked 192.0.2.0/24: drop, expires in 1h" in capsys.readouterr().out
    assert block(state, "add", "2001:db8::/48", "--action", "deny") == 0
    assert block(state, "add", "198.51.100.7") == 0
    entries = {e["cidr"]: e for e in listed(state, capsys)}
    assert set(entries) == {"192.0.2.0/24", "2001:db8::/48", "198.51.100.7/32"}
    first = entries["192.0.2.0/24"]
    assert (first["action"], first["origin"], first["reason"]) == ("drop", "manual",
                                                                   "flood at 3am")
    assert 3590 <= first["remaining_s"] <= 3600
    assert entries["2001:db8::/48"]["action"] == "deny"
    assert entries["2001:db8::/48"]["expires"] is None

    # Adding again updates in place.
    assert block(state, "add", "192.0.2.0/24", "--action", "deny") == 0
    assert "updated 192.0.2.0/24" in capsys.readouterr().out
    entries = {e["cidr"]: e for e in listed(state, capsys)}
    assert entries["192.0.2.0/24"]["action"] == "deny"
    assert entries["192.0.2.0/24"]["expires"] is None

    assert block(state, "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["CIDR", "ACTION", "ORIGIN"] and len(table) == 4

    assert block(state, "remove", "192.0.2.0/24") == 0
    assert "removed 192.0.2.0/24" in capsys.readouterr().out
    assert block(state, "remove", "192.0.2.0/24") == 1
    assert "192.0.2.0/24 is not in the blocklist" in capsys.readouterr().err
    assert [e["cidr"] for e in listed(state, capsys)] == ["198.51.100.7/32", "2001:db8::/48"]


def test_expired_entries_are_hidden_then_purged(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24", "--ttl", "1s") == 0
    time.sleep(1.1)
    assert listed(state, capsys) == []
    assert [e["active"] for e in listed(state, capsys, "--all")] == [False]
    assert block(state, "list") == 0
    assert "empty (1 expired" in capsys.readouterr().out
    assert block(state, "add", "198.51.100.0/24") == 0  # a write purges what has lapsed
    assert rows(state) == 1


def test_state_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GUARDNTP_STATE_DIR", str(tmp_path / "env-state"))
    assert main(["block", "add", "192.0.2.1"]) == 0
    assert (tmp_path / "env-state" / FILENAME).exists()
    capsys.readouterr()
    assert main(["block", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["cidr"] == "192.0.2.1/32"


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["export"],
                                  ["export", "--format", "nft"], ["remove", "192.0.2.0/24"]])
def test_reading_commands_create_nothing_and_say_the_directory_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    state = tmp_path / "never-made"  # a mistyped --state-dir is not an empty blocklist
    assert block(state, *args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"guardntp: blocklist: state directory {state} does not exist"]
    assert not state.exists()


def test_a_directory_without_a_blocklist_is_an_empty_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    assert block(state, "list") == 0
    assert "empty" in capsys.readouterr().out
    assert block(state, "export", "--format", "nft") == 0
    assert block(state, "remove", "192.0.2.0/24") == 1
    assert "there is no blocklist" in capsys.readouterr().err
    assert list(state.iterdir()) == []


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("args", "message"), [
    (["add", "10.0.0.300"], "'10.0.0.300' is not an IPv4 or IPv6 address or CIDR"),
    (["add", "10.0.0.1/8"], "has host bits set past the /8; did you mean 10.0.0.0/8?"),
    (["add", "2001:db8::1/32"], "did you mean 2001:db8::/32?"),
    (["add", "192.0.2.0/33"], "not an IPv4 or IPv6"),
    (["add", "192.0.2.0/24", "--ttl", "5x"], "--ttl '5x' is not a duration"),
    (["add", "192.0.2.0/24", "--ttl", "0"], "longer than zero"),
    (["add", "192.0.2.0/24", "--action", "reject"], "invalid choice"),
    (["remove", "nonsense"], "not an IPv4 or IPv6"),
    (["export", "--format", "pf"], "invalid choice"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     args: list[str], message: str) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "203.0.113.0/24") == 0
    capsys.readouterr()
    assert block(state, *args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert rows(state) == 1


@pytest.mark.parametrize("cidr", ["::/0", "0.0.0.0/0", "128.0.0.0/1", "10.0.0.0/7",
                                  "2000::/3", "2000::/15"])
def test_a_wide_network_needs_allow_wide(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         cidr: str) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "203.0.113.0/24") == 0
    capsys.readouterr()
    assert block(state, "add", cidr) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cidr} (" in err and "--allow-wide" in err
    assert rows(state) == 1

    assert block(state, "add", cidr, "--allow-wide") == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"guardntp: warning: blocking {cidr} (")
    assert captured.err.count("\n") == 1
    assert captured.out.startswith(f"blocked {cidr}: drop")
    assert rows(state) == 2


def test_the_widest_networks_taken_without_allow_wide(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "10.0.0.0/8") == 0
    assert block(state, "add", "2001::/16") == 0
    assert capsys.readouterr().err == ""


def test_an_import_with_a_wide_network_needs_allow_wide(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    feed = tmp_path / "feed.txt"
    feed.write_text("192.0.2.0/24\n0.0.0.0/0  # a template line left in\n::/0\n")
    assert block(state, "import", str(feed)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{feed}: 0.0.0.0/0 (all of IPv4), ::/0 (all of IPv6): wider than" in err
    assert not (state / FILENAME).exists() or rows(state) == 0
    assert block(state, "import", str(feed), "--allow-wide") == 0
    assert "warning: " in capsys.readouterr().err
    assert rows(state) == 3


def test_a_full_disk_is_reported_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from guardntp.blocklist.store import BlockStore

    state = tmp_path / "state"
    assert block(state, "add", "203.0.113.0/24") == 0
    opened = BlockStore.in_state_dir.__func__  # type: ignore[attr-defined]

    def nearly_full(cls: type[BlockStore], *args: object, **kwargs: object) -> BlockStore:
        store = opened(cls, *args, **kwargs)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a disk that is full
        return store

    monkeypatch.setattr(BlockStore, "in_state_dir", classmethod(nearly_full))
    feed = tmp_path / "feed.txt"
    feed.write_text("".join(f"10.{i // 256}.{i % 256}.0/24\n" for i in range(5000)))
    capsys.readouterr()
    assert block(state, "import", str(feed)) == 1
    err = capsys.readouterr().err
    assert "database or disk is full; nothing imported" in err, err
    assert "rollback" not in err
    monkeypatch.undo()
    assert rows(state) == 1
    assert block(state, "add", "192.0.2.0/24") == 0  # the file is fine for the next write


def test_bad_import_file_imports_nothing_and_names_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    feed = tmp_path / "feed.txt"
    feed.write_text("# scanners\n192.0.2.0/24\n\n10.0.0.1/8   # typo\n198.51.100.0/24\n"
                    "not-an-address\n2001:db8::/32\n")
    assert block(state, "import", str(feed)) == 1
    err = capsys.readouterr().err
    assert f"{feed}:4: '10.0.0.1/8' has host bits set" in err
    assert f"{feed}:6: 'not-an-address' is not an IPv4 or IPv6" in err
    assert "2 bad line(s); nothing imported" in err
    assert not (state / FILENAME).exists() or rows(state) == 0


def test_import_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert block(tmp_path / "s", "import", str(tmp_path / "missing.txt")) == 1
    assert "cannot read: No such file or directory" in capsys.readouterr().err


def test_binary_garbage_is_reported_not_raised(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "feed.bin"
    feed.write_bytes(b"192.0.2.0/24\n\xff\xfe\x00junk\n")
    assert block(tmp_path / "s", "import", str(feed)) == 1
    assert ":2:" in capsys.readouterr().err


def test_import_export_round_trip_and_replace(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    state, copy = tmp_path / "state", tmp_path / "copy"
    feed = tmp_path / "feed.txt"
    feed.write_text("192.0.2.0/24\n198.51.100.7 # one host\n2001:db8::/32\n")
    assert block(state, "import", str(feed), "--ttl", "2h", "--reason", "feed A") == 0
    assert "imported 3 entries" in capsys.readouterr().out
    assert block(state, "add", "203.0.113.0/24") == 0
    entries = listed(state, capsys)
    assert {e["origin"] for e in entries} == {"import", "manual"}
    assert {e["reason"] for e in entries if e["origin"] == "import"} == {"feed A"}

    exported = tmp_path / "export.txt"
    assert block(state, "export", "--output", str(exported)) == 0
    assert block(copy, "import", str(exported)) == 0
    assert [e["cidr"] for e in listed(copy, capsys)] == [e["cidr"] for e in entries]

    # --replace swaps the imported entries in one transaction; manual ones stay.
    feed.write_text("192.0.2.0/24\n")
    assert block(state, "import", str(feed), "--replace") == 0
    assert sorted(e["cidr"] for e in listed(state, capsys)) == ["192.0.2.0/24",
                                                                "203.0.113.0/24"]


def test_import_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"192.0.2.0/24\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert block(tmp_path / "s", "import", "-") == 0
    assert [e["reason"] for e in listed(tmp_path / "s", capsys)] == ["import <stdin>"]


# ---------------------------------------------------------------------------- concurrency

WRITER = textwrap.dedent("""
    import ipaddress, sys, time
    from pathlib import Path
    from guardntp.blocklist.entries import BlockEntry
    from guardntp.blocklist.store import BlockStore
    state, first_octet, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = BlockStore.in_state_dir(state)
    deadline = time.monotonic() + 20
    while not (state / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.001)  # start together, so the writers really overlap
    for i in range(count):
        network = ipaddress.IPv4Network((first_octet << 24 | i << 8, 24))
        now = time.time_ns()
        store.upsert([BlockEntry(network, "drop", f"writer {first_octet}", now, None,
                                 "manual")], now)
    print("done")
""")


def test_two_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "203.0.113.0/24") == 0  # the file exists before they start
    count = 300
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(state), str(octet),
                                 str(count)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for octet in (10, 11)]
    # A third writer through the CLI at the same time: an import of its own.
    feed = tmp_path / "feed.txt"
    feed.write_text("".join(f"12.0.{i % 256}.{i // 256}/32\n" for i in range(count)))
    time.sleep(0.5)  # let both writers reach the start line
    (state / "go").touch()
    assert block(state, "import", str(feed)) == 0
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert out.strip() == "done"
    with sqlite3.connect(state / FILENAME) as db:
        by_origin = dict(db.execute("SELECT reason, count(*) FROM blocks GROUP BY reason"))
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert by_origin == {"writer 10": count, "writer 11": count,
                         f"import {feed}": count, "": 1}


def test_kill_during_import_leaves_all_or_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    assert block(state, "add", "2001:db8::/32") == 0
    count = 200_000
    feed = tmp_path / "big.txt"
    feed.write_text("".join(f"{10 + i // 65536}.{i // 256 % 256}.{i % 256}.0/24\n"
                            for i in range(count)))
    wal = state / (FILENAME + "-wal")
    killed_mid_write = 0
    for _ in range(3):  # a few tries at catching the writer inside its transaction
        baseline = wal.stat().st_size if wal.exists() else 0
        process = subprocess.Popen([sys.executable, "-m", "guardntp", "block", "import",
                                    str(feed), "--state-dir", str(state)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        # The transaction spills pages into the WAL long before it commits: once the
        # WAL has grown, the writer is mid-transaction. Kill it there.
        while process.poll() is None and time.monotonic() < deadline:
            if wal.exists() and wal.stat().st_size > baseline + 256 * 1024:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait(timeout=30)
        total = rows(state)
        assert total in (2, 2 + count), f"half an import: {total} rows"
        if process.returncode == -signal.SIGKILL and total == 2:
            killed_mid_write += 1
            break
    assert killed_mid_write, "never caught the import mid-transaction"
    with sqlite3.connect(state / FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The file is healthy: the same import now goes through whole.
    assert block(state, "import", str(feed)) == 0
    assert rows(state) == 2 + count


def test_cli_never_leaves_a_traceback_on_a_broken_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FILENAME).write_bytes(b"this is not a database" * 100)
    assert block(state, "add", "192.0.2.0/24") == 1
    err = capsys.readouterr().err
    assert "blocklist:" in err and FILENAME in err and "Traceback" not in err
    assert block(state, "list") == 1
    assert os.path.getsize(state / FILENAME) == len(b"this is not a database" * 100)


@pytest.mark.parametrize(("cidr", "stored"), [
    ("not-a-cidr", "'not-a-cidr'"),
    ("10.0.0.1/8", "'10.0.0.1/8'"),
    ("12345", "'12345'"),
    (b"\x01", "b'\\x01'"),      # a BLOB keeps its type in a TEXT column
])
@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["export"],
                                  ["export", "--format", "nft"]])
def test_a_row_written_by_hand_that_is_no_entry_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cidr: object, stored: str,
        args: list[str]) -> None:
    # The sqlite3 shell writes what it likes; listing and exporting name the row.
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    with sqlite3.connect(state / FILENAME) as db:
        db.execute("INSERT INTO blocks VALUES (?, 'drop', '', 1, NULL, 'manual')", (cidr,))
    capsys.readouterr()
    assert block(state, *args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"the row for {stored} is not a blocklist entry" in captured.err
    assert captured.out == ""


def test_a_row_with_a_time_that_is_no_integer_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    with sqlite3.connect(state / FILENAME) as db:
        db.execute("UPDATE blocks SET created_ns = 'yesterday', expires_ns = 'soon'")
    capsys.readouterr()
    assert block(state, "list") == 1
    err = capsys.readouterr().err
    assert "the row for '192.0.2.0/24' is not a blocklist entry" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("args", [["list"], ["export"], ["remove", "192.0.2.0/24"]])
def test_a_blocklist_this_user_cannot_see_is_not_an_empty_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: list[str]) -> None:
    # os.path.lexists says False for a file in a directory this user may not search
    # (a 0700 state directory of root's, for a user); that is no empty blocklist.
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    real_lstat = os.lstat

    def refuse(path: object, *rest: object, **kwargs: object) -> os.stat_result:
        if str(path) == str(state / FILENAME):
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", refuse)
    capsys.readouterr()
    assert block(state, *args) == 1
    captured = capsys.readouterr()
    assert captured.err == f"guardntp: blocklist: {state / FILENAME}: Permission denied\n"
    assert "empty" not in captured.out


@pytest.mark.parametrize(("cidr", "hint"), [("fe80::1%eth0", "write fe80::1"),
                                            ("fe80::%eth0/64", "write fe80::/64")])
def test_a_scoped_address_is_refused_not_stored_with_its_scope(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cidr: str, hint: str) -> None:
    # Stored as "fe80::1%eth0/128" it exported an nft set nft refuses, and
    # `block remove fe80::1` never found it.
    state = tmp_path / "state"
    assert block(state, "add", cidr) == 2
    err = capsys.readouterr().err
    assert "a network has no scope (%eth0)" in err and hint in err
    assert not (state / FILENAME).exists()


def test_a_very_long_line_is_not_echoed_whole(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "feed.txt"
    feed.write_text("1" * 1_000_000 + "\n" + "2 " * 100_000 + "\n")
    assert block(tmp_path / "state", "import", str(feed)) == 1
    err = capsys.readouterr().err
    assert len(err) < 1000, len(err)
    assert f"{feed}:1: " in err and "(1000000 characters) is too long" in err
    assert f"{feed}:2: " in err and "one CIDR per line" in err


def test_an_import_file_too_large_is_refused_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from guardntp.commands import block as block_command
    monkeypatch.setattr(block_command, "MAX_IMPORT_BYTES", 1 << 20)
    assert block(tmp_path / "state", "import", "/dev/zero") == 1
    assert capsys.readouterr().err == ("guardntp: /dev/zero: larger than 1 MiB; nothing "
                                       "imported (split it)\n")
    assert block(tmp_path / "state", "import", "") == 2
    assert "the import file name is empty" in capsys.readouterr().err


def test_export_into_a_fifo_writes_into_it_not_over_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Renaming over it replaced the FIFO (as root: /dev/full, /dev/stdout) with a file.
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        assert block(state, "export", "--output", str(fifo)) == 0
        out, _ = reader.communicate(timeout=10)
    finally:
        reader.kill()
    assert b"192.0.2.0/24" in out
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "state"]


def test_a_failed_export_leaves_no_temporary_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    assert block(state, "export", "-o", str(tmp_path / "out")) == 1
    assert capsys.readouterr().err == (f"guardntp: {tmp_path / 'out'}: cannot write: "
                                       "Is a directory\n")
    assert block(state, "export", "-o", "") == 2
    assert "the file name is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "state"]
    assert list((tmp_path / "out").iterdir()) == []


def test_output_that_cannot_be_written_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `guardntp block export > /dev/full`: the write fails with ENOSPC.
    import errno

    state = tmp_path / "state"
    assert block(state, "add", "192.0.2.0/24") == 0
    capsys.readouterr()

    def full(text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys.stdout, "write", full)
    assert block(state, "export") == 1
    assert capsys.readouterr().err == "guardntp: cannot write the output: No space left on device\n"
