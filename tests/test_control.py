"""``guardntp clients|stats|reload`` against a running server, over its control socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_udp_port, guardntp_server
from test_control_channel import attacker

from guardntp import client
from guardntp.cli import main
from guardntp.control.channel import (
    MAX_CONNECTIONS,
    MAX_REQUEST,
    ControlError,
    peer_allowed,
    request,
    socket_path,
)
from guardntp.control.reports import client_rows, format_clients, source_text
from guardntp.filter.reference import new_record

pytestmark = pytest.mark.slow

LOOSE = ("--set", "filter.source_rate=1000", "--set", "filter.source_burst=1000")


def ask(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def query_from(address: str, port: int, version: int = 4) -> bytes:
    """One request from a chosen loopback source address; the reply's bytes."""
    pending = client.build_request(0x5555_0000_0000_0001, version=version)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        sock.settimeout(2)
        sock.sendto(pending.wire, ("127.0.0.1", port))
        return sock.recv(1024)


def raw_request(state: Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path(state)))
        sock.send(payload)
        return dict(json.loads(sock.recv(1 << 20)))


@pytest.fixture
def running(tmp_path: Path) -> Iterator:
    with guardntp_server(tmp_path, *LOOSE) as server:
        yield server


def test_clients_lists_each_source_with_its_counts(
        running, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(running.state_dir)
    for _ in range(5):
        query_from("127.0.0.1", running.port)
    query_from("127.0.0.2", running.port, version=3)
    status, out, _ = ask(capsys, "clients", "--json", "--state-dir", state)
    assert status == 0
    reply = json.loads(out)
    rows = {row["source"]: row for row in reply["clients"]}
    assert set(rows) == {"127.0.0.1", "127.0.0.2"} and reply["total"] == 2
    local, other = rows["127.0.0.1"], rows["127.0.0.2"]
    # wait_until_answering sent at least one more from 127.0.0.1.
    assert local["requests"] >= 6 and local["replies"] == local["requests"]
    assert local["label"] == "ntpv4,fast-poller"   # 6 requests within a second or two
    assert local["interval_s"] < 15 and local["last_seen_s"] < 5
    assert (other["label"], other["requests"], other["interval_s"]) == ("ntpv3", 1, None)
    # The TTL the server's socket reports (IP_RECVTTL): 64 on loopback, no other class.
    assert (local["ttl"], local["other_ttl"]) == (64, None) and local["crowd"] >= 1

    status, out, _ = ask(capsys, "clients", "--json", "--limit", "1", "--state-dir", state)
    assert [r["source"] for r in json.loads(out)["clients"]] == ["127.0.0.1"]
    status, out, _ = ask(capsys, "clients", "--json", "--sort", "last", "-n", "1",
                         "--state-dir", state)
    assert [r["source"] for r in json.loads(out)["clients"]] == ["127.0.0.2"]

    status, out, _ = ask(capsys, "clients", "--state-dir", state)
    lines = out.splitlines()
    assert lines[0].split() == ["SOURCE", "LABEL", "REQUESTS", "REPLIES", "KODS", "DROPS",
                                "INTERVAL", "LAST", "CROWD", "TTL"]
    assert lines[1].startswith("127.0.0.1 ") and "ago" in lines[1]


def test_stats_counts_verdicts_reasons_labels_and_tables(
        running, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(running.state_dir)
    status, out, _ = ask(capsys, "stats", "--json", "--state-dir", state)
    before = json.loads(out)
    for _ in range(3):
        query_from("127.0.0.1", running.port)
    assert main(["block", "add", "127.0.0.3", "--state-dir", state]) == 0
    time.sleep(1.0)
    with pytest.raises(TimeoutError):
        query_from("127.0.0.3", running.port)
    status, out, _ = ask(capsys, "stats", "--json", "--state-dir", state)
    after = json.loads(out)
    assert after["verdicts"]["time"] == before["verdicts"]["time"] + 3
    assert after["reasons"]["blocklisted"] == 1
    assert after["verdicts"]["drop"] == before["verdicts"]["drop"] + 1
    assert after["labels"]["ntpv4"] == before["labels"]["ntpv4"] + 4
    assert after["packets"] == before["packets"] + 4
    assert after["tables"]["sources"]["entries"] == 2
    assert after["tables"]["sources"]["evictions"] == 0
    assert after["table_full"] == 0
    assert after["blocklist"]["active_entries"] == 1
    assert after["blocklist"]["auto"] is False

    status, out, _ = ask(capsys, "stats", "--state-dir", state)
    assert status == 0
    assert "blocklisted" in out and "1 active entries" in out and "evictions" in out


def test_reload_applies_a_good_file_and_keeps_running_on_a_bad_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "guardntp.toml"
    config.write_text("[filter]\nsource_rate = 100.0\nsource_burst = 100\n")
    with guardntp_server(tmp_path, "--config", str(config)) as server:
        state = str(server.state_dir)
        config.write_text("[filter]\nsource_rate = 50.0\nsource_burst = 100\n")
        status, out, _ = ask(capsys, "reload", "--state-dir", state)
        assert status == 0 and "source rate 50.0/s" in out

        config.write_text("[filter]\nsource_rate = -1\n")
        status, out, err = ask(capsys, "reload", "--state-dir", state)
        assert status == 1
        assert "reload refused" in err and "filter.source_rate" in err
        assert "Traceback" not in err

        config.write_text("[filter]\nsource_rate = 50.0\n[blocklist]\nauto_ttl = \"5x\"\n")
        status, _, err = ask(capsys, "reload", "--state-dir", state)
        assert status == 1 and "blocklist.auto_ttl" in err

        # Still serving, with the last good settings.
        client.exchange("127.0.0.1", server.port, timeout_s=2)
        assert server.process.poll() is None
        status, out, _ = ask(capsys, "stats", "--json", "--state-dir", state)
        assert status == 0


def test_no_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    for command in ("clients", "stats", "reload"):
        status, _, err = ask(capsys, command, "--state-dir", str(tmp_path))
        assert status == 1
        assert "no server is running with state directory" in err
        assert "Traceback" not in err


def test_bad_requests_get_errors_and_an_idle_peer_blocks_no_one(
        running, capsys: pytest.CaptureFixture[str]) -> None:
    state = running.state_dir
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    idle.connect(str(socket_path(state)))  # connects and then says nothing
    try:
        assert raw_request(state, b"not json") == {"ok": False, "error": "request is not JSON"}
        assert "unknown command" in raw_request(state, b'{"command": "shutdown"}')["error"]
        assert "longer than" in raw_request(state, b"x" * (MAX_REQUEST + 10))["error"]
        assert "unknown sort" in raw_request(
            state, b'{"command": "clients", "sort": "bogus"}')["error"]
        assert "limit" in raw_request(state, b'{"command": "clients", "limit": -3}')["error"]
        reply = raw_request(state, b'{"command": "stats"}')
        assert reply["ok"] and reply["packets"] >= 1
        client.exchange("127.0.0.1", running.port, timeout_s=2)
    finally:
        idle.close()
    assert "Traceback" not in running.log()


def test_other_users_are_refused_by_peer_credentials(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    # A directory other users may traverse; the control directory is then opened up
    # on purpose, so only the SO_PEERCRED check stands between them and the server.
    base = Path(tempfile.mkdtemp(prefix="guardntp-peercred-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        with guardntp_server(base, *LOOSE) as server:
            path = socket_path(server.state_dir)
            os.chmod(server.state_dir, 0o755)
            os.chmod(path.parent, 0o755)
            os.chmod(path, 0o666)
            reply = json.loads(as_nobody(path, b'{"command": "stats"}'))
            assert reply["ok"] is False
            assert "permission denied: uid 65534" in reply["error"]
            assert "refused a connection from uid 65534" in server.log()
            # Root still gets in.
            status, out, _ = ask(capsys, "stats", "--json", "--state-dir",
                                 str(server.state_dir))
            assert status == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(path: Path, payload: bytes) -> bytes:
    """Send ``payload`` to the socket from a forked child running as uid/gid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, ask, hand the reply back, exit at once
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.send(payload)
                os.write(write_end, sock.recv(65536))
            status = 0
        except BaseException as error:
            os.write(write_end, f"child failed: {error!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, b"".join(chunks)
    return b"".join(chunks)


def test_a_deep_state_directory_still_works(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with guardntp_server(deep, *LOOSE) as server:
        assert len(str(socket_path(server.state_dir))) > 108
        status, out, _ = ask(capsys, "stats", "--json", "--state-dir", str(server.state_dir))
        assert status == 0 and json.loads(out)["packets"] >= 1
    assert not socket_path(server.state_dir).exists()  # removed on a clean stop


def test_a_second_server_on_the_same_state_directory_is_refused(running) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", "serve", "--clock", "local", "--listen",
         f"127.0.0.1:{free_udp_port()}", "--state-dir", str(running.state_dir)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "another guardntp server already uses" in result.stderr
    assert "Traceback" not in result.stderr
    # ... and the first one's socket is untouched.
    assert raw_request(running.state_dir, b'{"command": "stats"}')["ok"]


def test_a_deeply_nested_frame_leaves_the_server_serving(
        running, capsys: pytest.CaptureFixture[str]) -> None:
    state = running.state_dir
    for frame in (b"[" * 1000, b'{"a":' * 1000, b"[" * 1000 + b"]" * 1000):
        reply = raw_request(state, frame)
        assert reply["ok"] is False and "deeper than" in reply["error"]
    assert raw_request(state, b"\xff\xfe{")["error"] == "request is not JSON"
    assert running.process.poll() is None
    status, out, _ = ask(capsys, "stats", "--json", "--state-dir", str(state))
    assert status == 0 and json.loads(out)["packets"] >= 1
    client.exchange("127.0.0.1", running.port, timeout_s=2)
    log = running.log()
    assert "Traceback" not in log and "RecursionError" not in log
    assert "control: bad request: request nests" in log


def test_idle_connections_reopened_in_a_loop_do_not_lock_out_stats(running) -> None:
    state = running.state_dir
    with attacker(socket_path(state).parent, MAX_CONNECTIONS + 8, seconds=6.0):
        for _ in range(10):
            assert request(state, {"command": "stats"}, timeout_s=5)["ok"] is True
            time.sleep(0.2)
        client.exchange("127.0.0.1", running.port, timeout_s=2)
    assert running.process.poll() is None
    assert "Traceback" not in running.log()


def test_a_removed_state_directory_gets_its_control_socket_back(running) -> None:
    state = running.state_dir
    shutil.rmtree(state)
    deadline = time.monotonic() + 10
    reply: dict = {}
    while time.monotonic() < deadline and not reply:
        try:
            reply = request(state, {"command": "stats"}, timeout_s=2)
        except ControlError:
            time.sleep(0.2)
    assert reply.get("ok") is True
    assert oct(os.lstat(socket_path(state).parent).st_mode & 0o777) == "0o700"
    # ... so a second server on the same directory is still refused.
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", "serve", "--clock", "local", "--listen",
         f"127.0.0.1:{free_udp_port()}", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0 and "another guardntp server already uses" in result.stderr
    log = running.log()
    assert log.count("re-created it") == 1 and "Traceback" not in log


# ---------------------------------------------------------------------------- pure parts

def test_peer_rule() -> None:
    assert peer_allowed(0, 1000) and peer_allowed(1000, 1000)
    assert not peer_allowed(1001, 1000)


def test_rows_sort_and_limit_without_a_server() -> None:
    records = {}
    for index, requests in enumerate((5, 50, 1)):
        record = new_record(0, "ntpv4", 123)
        record[1] = requests          # REQUESTS
        record[6] = requests * 1_000_000_000  # LAST_SEEN
        records[bytes([192, 0, 2, index])] = record
    records[bytes.fromhex("20010db800010002")] = new_record(0, "ntpv3", 123)
    top = client_rows(records, 100 * 1_000_000_000, "requests", 2)
    assert [row["source"] for row in top] == ["192.0.2.1", "192.0.2.0"]
    assert top[0]["label"] == "ntpv4,fast-poller"
    assert client_rows(records, 0, "address", 1)[0]["source"] == "192.0.2.0"
    assert source_text(bytes.fromhex("20010db800010002")) == "2001:db8:1:2::/64"
    assert len(client_rows(records, 0, "requests", 0)) == 4
    assert "2001:db8:1:2::/64" in format_clients(client_rows(records, 0, "interval", 0))
