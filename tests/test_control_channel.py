"""The control channel driven directly: a real socket, a tiny event loop in a thread.

No ``guardntp serve`` here (see test_control.py for that): ``ControlServer`` gets
the same ``add_reader``/``remove_reader`` pair the server's loop offers, and the
tests decide when its ``sweep`` runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from guardntp.control import channel
from guardntp.control.channel import (
    MAX_CONNECTIONS,
    ControlError,
    ControlServer,
    max_nesting,
    request,
    socket_path,
)


class FakeLoop:
    """``add_reader``/``remove_reader`` over a selector, like ``Server``'s; run in a thread.

    An exception that escapes a callback ends the loop, as it would end the real
    server; it is kept in ``errors`` for the test to look at.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], threading.Event]] = (
            queue.SimpleQueue())
        self.errors: list[BaseException] = []
        self._stop = threading.Event()

    def add_reader(self, sock: socket.socket, callback: Callable[[socket.socket], None]
                   ) -> None:
        self.selector.register(sock, selectors.EVENT_READ, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)

    def run_once(self, timeout: float = 0.02) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                call, done = self.calls.get_nowait()
                try:
                    call()
                finally:
                    done.set()
        for key, _ in self.selector.select(timeout):
            key.data(key.fileobj)

    def call(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on the loop's thread (as the server's timers do) and wait."""
        done = threading.Event()
        self.calls.put((function, done))
        assert done.wait(10), "the loop did not run the call"

    @contextlib.contextmanager
    def running(self, limit_s: float = 60.0) -> Iterator[FakeLoop]:
        def serve() -> None:
            deadline = time.monotonic() + limit_s
            try:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    self.run_once()
            except BaseException as error:  # what would have ended the server
                self.errors.append(error)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)


def stats(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    return {"packets": 7, "verdicts": {}, "reasons": {}, "labels": {}, "tables": {}}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@contextlib.contextmanager
def control_server(state: Path, handlers: dict[str, channel.Handler] | None = None
                   ) -> Iterator[tuple[ControlServer, FakeLoop]]:
    loop = FakeLoop()
    server = ControlServer(state, handlers or {"stats": stats}, loop.add_reader,
                           loop.remove_reader)
    try:
        yield server, loop
    finally:
        if not loop._stop.is_set():
            loop._stop.set()
        server.close()


def raw(state: Path, payload: bytes, timeout_s: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout_s)
        with channel._short_path(socket_path(state)) as address:
            sock.connect(address)
        sock.send(payload)
        return sock.recv(1 << 20)


@contextlib.contextmanager
def connected(state: Path) -> Iterator[socket.socket]:
    """A client connection to the control socket, closed afterwards."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(5)
        with channel._short_path(socket_path(state)) as address:
            client.connect(address)
        yield client


def one_line_error(reply: bytes) -> str:
    assert b"\n" not in reply
    decoded = json.loads(reply)
    assert decoded["ok"] is False and isinstance(decoded["error"], str)
    return str(decoded["error"])


# ---------------------------------------------------------------------------- malformed

NESTED = [
    b"[" * 1000,                                  # the 1,000-byte frame that killed it
    b"[" * 1000 + b"]" * 1000,                    # well-formed, just deep
    b'{"a":' * 900 + b"1" + b"}" * 900,
    b'{"command": "stats", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"[{" * 600,
]
MALFORMED = [
    b"",  b"   ", b"not json", b"\xff\xfe\x00{", b'{"command": "st\xc3"}', b"[]", b'"stats"',
    b"17", b"null", b'{"command": 5}', b'{"command": ["stats"]}', b'{"cmd": "stats"}',
    b'{"command": "stats"} {"command": "stats"}', b'{"command": "stats"',
    b"\x00" * 100, b'{"command": "\\ud800"}' + b"}" * 3,
]


@pytest.mark.parametrize("payload", NESTED + MALFORMED)
def test_a_malformed_request_gets_a_one_line_error_and_never_an_exception(
        state: Path, payload: bytes) -> None:
    with control_server(state) as (server, _):
        one_line_error(server.answer(payload, 65536))


def test_nesting_is_measured_outside_strings_only() -> None:
    assert max_nesting(b'{"command": "stats"}') == 1
    assert max_nesting(b'{"a": [1, {"b": []}]}') == 4
    assert max_nesting(b'{"note": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert max_nesting(b'{"note": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\\"}') == 1
    assert max_nesting(b"[" * 1000) == 1000
    assert max_nesting(b"") == 0


def test_brackets_inside_strings_do_not_make_a_request_too_deep(state: Path) -> None:
    with control_server(state) as (server, _):
        reply = json.loads(server.answer(
            b'{"command": "stats", "note": "' + b"[" * 5000 + b'"}', 65536))
        assert reply["ok"] is True and reply["packets"] == 7


def test_a_nested_frame_on_the_socket_leaves_the_loop_serving(state: Path) -> None:
    with control_server(state) as (_, loop), loop.running():
        assert "nest" in one_line_error(raw(state, b"[" * 1000))
        assert "JSON" in one_line_error(raw(state, b"\xff" * 10))
        assert request(state, {"command": "stats"})["packets"] == 7
    assert loop.errors == []


def test_an_unknown_command_is_echoed_short(state: Path) -> None:
    with control_server(state) as (server, _):
        error = one_line_error(server.answer(
            json.dumps({"command": "x" * 10000 + "\n"}).encode(), 65536))
        assert "unknown command" in error and len(error) < 300 and "stats" in error


# ---------------------------------------------------------------------------- handler errors

def _bad_argument(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    raise ValueError("unknown sort 'bogus'\n(known: requests)")


def _bug(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    return {"rows": {}["missing"]}


def _unserialisable(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    return {"when": object()}


def _deep_bug(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    def down(n: int) -> int:
        return down(n + 1)
    return {"n": down(0)}


HANDLERS: dict[str, channel.Handler] = {
    "stats": stats, "bad": _bad_argument, "bug": _bug, "unserialisable": _unserialisable,
    "deep": _deep_bug}


def test_a_handler_raising_on_a_bad_argument_is_one_warning_without_traceback(
        state: Path, caplog: pytest.LogCaptureFixture) -> None:
    with control_server(state, HANDLERS) as (server, _):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="guardntp.control"):
            error = one_line_error(server.answer(b'{"command": "bad"}', 65536))
        assert "unknown sort 'bogus'" in error
        records = [r for r in caplog.records if r.name == "guardntp.control"]
        assert [r.levelno for r in records] == [logging.WARNING]
        assert records[0].exc_info is None and "\n" not in records[0].getMessage()
        assert server.errors == 1


@pytest.mark.parametrize("command, kind", [("bug", "KeyError"),
                                           ("unserialisable", "TypeError"),
                                           ("deep", "RecursionError")])
def test_a_bug_in_a_handler_is_one_error_line_with_its_type(
        state: Path, caplog: pytest.LogCaptureFixture, command: str, kind: str) -> None:
    with control_server(state, HANDLERS) as (server, _):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="guardntp.control"):
            error = one_line_error(server.answer(
                json.dumps({"command": command}).encode(), 65536))
        assert f"{command} failed" in error and kind in error
        records = [r for r in caplog.records if r.name == "guardntp.control"]
        assert [r.levelno for r in records] == [logging.ERROR]
        assert records[0].exc_info is None and kind in records[0].getMessage()
        assert "\n" not in records[0].getMessage()


def test_handler_errors_over_the_socket_leave_the_loop_serving(state: Path) -> None:
    with control_server(state, HANDLERS) as (_, loop), loop.running():
        for command in ("bad", "bug", "unserialisable", "deep"):
            one_line_error(raw(state, json.dumps({"command": command}).encode()))
        assert request(state, {"command": "stats"})["ok"] is True
    assert loop.errors == []


# ---------------------------------------------------------------------------- lock-out

# Holds ``count`` idle connections and, in a tight loop bounded by time and count,
# re-opens each one the server closes, and opens and drops one more every round.
ATTACKER = r"""
import os, select, socket, sys, time
os.chdir(sys.argv[1])
count, seconds = int(sys.argv[2]), float(sys.argv[3])
def open_one():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(1.0)
    try:
        s.connect("guardntp.sock")
    except OSError:
        s.close()
        return None
    return s
held = [s for s in (open_one() for _ in range(count)) if s is not None]
print("ready", len(held), flush=True)
deadline = time.monotonic() + seconds
reopened = 0
while time.monotonic() < deadline and reopened < 100000:
    closed, _, _ = select.select(held, [], [], 0)
    for s in closed:
        held.remove(s)
        s.close()
    while len(held) < count and time.monotonic() < deadline:
        s = open_one()
        reopened += 1
        if s is not None:
            held.append(s)
    extra = open_one()
    reopened += 1
    if extra is not None:
        extra.close()
print("done", reopened, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def attacker(directory: Path, count: int, seconds: float) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", ATTACKER, str(directory), str(count),
                                str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("ready")
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_idle_connections_reopened_in_a_loop_do_not_lock_out_the_operator(
        state: Path) -> None:
    # Nothing sweeps here: eviction alone has to make room.
    with control_server(state) as (server, loop), loop.running(), \
            attacker(socket_path(state).parent, MAX_CONNECTIONS + 8, seconds=4.0):
        deadline = time.monotonic() + 3.0
        answered = 0
        while time.monotonic() < deadline and answered < 40:
            assert request(state, {"command": "stats"}, timeout_s=5)["packets"] == 7
            answered += 1
        assert answered >= 5
        sizes: list[int] = []
        loop.call(lambda: sizes.append(len(server.connections)))  # between callbacks
        assert sizes[0] <= MAX_CONNECTIONS and server.evicted > 0
    assert loop.errors == []


def test_full_table_evicts_an_idle_connection_of_the_busiest_peer(state: Path) -> None:
    with control_server(state) as (server, loop), loop.running(), \
            attacker(socket_path(state).parent, MAX_CONNECTIONS + 4, seconds=0.0):
        time.sleep(0.3)
        assert len(server.connections) == MAX_CONNECTIONS and server.evicted == 4
        # An idle connection of this process outlives a second flood from another one.
        mine = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine, channel._short_path(socket_path(state)) as address:
            mine.settimeout(5)
            mine.connect(address)
            with attacker(socket_path(state).parent, 3 * MAX_CONNECTIONS, seconds=1.0):
                time.sleep(0.3)
            mine.send(b'{"command": "stats"}')
            assert json.loads(mine.recv(65536))["packets"] == 7
        assert server.evicted > 4
    assert loop.errors == []


def test_eviction_takes_a_refused_peer_first_then_the_busiest_process() -> None:
    assert channel.eviction_victim([(1, False), (2, False), (2, False)]) == 1
    assert channel.eviction_victim([(1, False), (2, False), (3, True)]) == 2
    assert channel.eviction_victim([(5, False), (1, False), (5, False), (1, False)]) == 0
    assert channel.eviction_victim([(9, False)]) == 0


def test_a_request_waiting_in_a_connection_is_served_not_swept(state: Path) -> None:
    with control_server(state) as (server, loop):
        with connected(state) as client:
            loop.run_once()                              # accepted, nothing to read yet
            assert len(server.connections) == 1
            client.send(b'{"command": "stats"}')
            server.sweep(now=time.monotonic() + 60)      # past its deadline, but it asked
            assert json.loads(client.recv(65536))["packets"] == 7
        assert server.connections == {}


def test_an_idle_connection_goes_after_the_first_byte_timeout(state: Path) -> None:
    with control_server(state) as (server, loop):
        with connected(state) as client:
            loop.run_once()
            server.sweep()
            assert len(server.connections) == 1          # not yet
            server.sweep(now=time.monotonic() + channel.IDLE_TIMEOUT_S + 0.01)
            assert server.connections == {}
            assert client.recv(100) == b""
        assert channel.IDLE_TIMEOUT_S <= 2.0


# ---------------------------------------------------------------------------- socket lost

def test_a_deleted_state_directory_is_recreated_by_the_sweep(
        state: Path, caplog: pytest.LogCaptureFixture) -> None:
    with control_server(state) as (server, loop):
        shutil.rmtree(state)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="guardntp.control"):
            server.sweep()
            server.sweep()                               # once is enough
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "re-created" in warnings[0].getMessage()
        assert warnings[0].exc_info is None
        directory = socket_path(state).parent
        info = os.lstat(directory)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        sock_info = os.lstat(socket_path(state))
        assert stat.S_ISSOCK(sock_info.st_mode) and stat.S_IMODE(sock_info.st_mode) == 0o600
        with loop.running():
            assert request(state, {"command": "stats"})["packets"] == 7
        assert loop.errors == []
    assert not socket_path(state).exists()            # close() removes the new one


def test_a_replaced_socket_file_is_taken_back(state: Path) -> None:
    with control_server(state) as (server, loop):
        path = socket_path(state)
        path.unlink()
        decoy = state / "decoy"
        decoy.write_text("not ours")
        path.symlink_to(decoy)                           # never followed, only removed
        server.sweep()
        assert decoy.read_text() == "not ours"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with loop.running():
            assert request(state, {"command": "stats"})["ok"]


def test_the_socket_of_another_live_server_is_left_alone(
        state: Path, caplog: pytest.LogCaptureFixture) -> None:
    def other_stats(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
        return {"packets": 99}

    with control_server(state) as (first, first_loop):
        shutil.rmtree(state)
        with control_server(state, {"stats": other_stats}) as (_, second_loop):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="guardntp.control"):
                first.sweep()
                first.sweep()
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "another" in warnings[0].getMessage()
            with second_loop.running():
                assert request(state, {"command": "stats"})["packets"] == 99
        # The second one stopped and removed its own socket: the first takes the path back.
        first.sweep()
        with first_loop.running():
            assert request(state, {"command": "stats"})["packets"] == 7


def test_a_symlinked_control_directory_is_refused(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.mkdir()
    (state / channel.DIRECTORY).symlink_to(elsewhere)
    loop = FakeLoop()
    with pytest.raises(ControlError, match="symbolic link"):
        ControlServer(state, {"stats": stats}, loop.add_reader, loop.remove_reader)
    assert list(elsewhere.iterdir()) == []


def test_a_control_directory_swapped_for_a_symlink_is_not_followed(
        state: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    with control_server(state) as (server, _):
        shutil.rmtree(socket_path(state).parent)
        (state / channel.DIRECTORY).symlink_to(elsewhere)
        with caplog.at_level(logging.INFO, logger="guardntp.control"):
            server.sweep()
            server.sweep()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "symbolic link" in warnings[0].getMessage()
        assert list(elsewhere.iterdir()) == []


def test_the_socket_is_created_0600_without_chmod_by_path(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("chmod by path")

    monkeypatch.setattr(channel.os, "chmod", no_chmod)
    mask = os.umask(0o022)
    try:
        with control_server(state):
            assert stat.S_IMODE(os.lstat(socket_path(state)).st_mode) == 0o600
            assert stat.S_IMODE(os.lstat(socket_path(state).parent).st_mode) == 0o700
        assert os.umask(0o022) == 0o022               # put back after bind
    finally:
        os.umask(mask)


# ---------------------------------------------------------------------------- closed stdout

def _cli(state: Path, *argv: str, stdout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardntp", *argv, "--state-dir", str(state)],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=30,
                          check=False, cwd=REPO)


def _big_stats(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    return {**stats(request, max_reply), "filler": "x" * min(200_000, max_reply // 2)}


def _clients(request: dict[str, Any], max_reply: int) -> dict[str, Any]:
    return {"clients": [], "total": 0, "truncated": False}


def test_a_closed_stdout_ends_the_command_quietly_with_141(state: Path) -> None:
    with control_server(state, {"stats": stats, "clients": _clients}) as (_, loop), \
            loop.running():
        for argv in (("stats", "--json"), ("clients", "--json"), ("clients",)):
            read_end, write_end = os.pipe()
            os.close(read_end)                  # the reader has already gone
            try:
                result = _cli(state, *argv, stdout=write_end)
            finally:
                os.close(write_end)
            assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
            assert result.stderr == "" and result.returncode == 141, (argv, result)


def test_stats_piped_into_head_ends_quietly(state: Path) -> None:
    with control_server(state, {"stats": _big_stats}) as (_, loop), loop.running():
        command = (f"{sys.executable} -m guardntp stats --json --state-dir '{state}' "
                   "| head -c 1 >/dev/null; echo \"${PIPESTATUS[0]}\" >&2")
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                timeout=30, check=False, cwd=REPO)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
        # 0 when everything fitted into the pipe before head left (timing decides).
        assert result.stderr.strip() in ("0", "141")


def test_an_open_stdout_still_gets_everything(state: Path) -> None:
    with control_server(state, {"stats": _big_stats}) as (_, loop), loop.running():
        result = _cli(state, "stats", "--json", stdout=subprocess.PIPE)
        assert result.returncode == 0 and json.loads(result.stdout)["packets"] == 7
