"""systemd socket activation: sockets from LISTEN_FDS at fd 3.., never bound by us."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_udp_port, wait_until_answering

from guardntp import systemd
from guardntp.systemd import ActivationError, listen_fd_numbers

REPO_UNITS = REPO / "contrib" / "systemd"


def test_listen_fds_for_this_pid_are_taken_and_the_variables_consumed() -> None:
    environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "HOME": "/"}
    assert listen_fd_numbers(environ, 4242) == [3, 4]
    assert environ == {"HOME": "/"}


def test_listen_fds_for_another_pid_are_ignored_but_still_consumed() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fd_numbers(environ, 4242) == []
    assert environ == {}
    assert listen_fd_numbers({}, 4242) == []


@pytest.mark.parametrize("count", ["x", "0", "-1", "1000"])
def test_a_nonsense_count_is_a_clear_error(count: str) -> None:
    with pytest.raises(ActivationError, match="LISTEN_FDS"):
        listen_fd_numbers({"LISTEN_PID": "7", "LISTEN_FDS": count}, 7)


#: What systemd does between fork and exec: move the sockets to fd 3.., set
#: LISTEN_PID to the pid that will exec, LISTEN_FDS to the count.
LAUNCHER = r"""
import fcntl, os, sys
# Out of the way first (fd >= 100), then into place: no socket overwrites another.
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1].split(",")]
for fd in sys.argv[1].split(","):
    os.close(int(fd))
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(high)))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def launch_activated(sockets: list[socket.socket], *argv: str, log: Path
                     ) -> subprocess.Popen[str]:
    fds = [sock.fileno() for sock in sockets]
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *argv],
            pass_fds=fds, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


@pytest.fixture
def bound_pair() -> Iterator[list[socket.socket]]:
    """An IPv4 and an IPv6 loopback UDP socket, bound here as systemd would."""
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.bind(("127.0.0.1", 0))
    sockets = [v4]
    if socket.has_ipv6:
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", 0))
            sockets.append(v6)
        except OSError:
            v6.close()
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_server_answers_on_sockets_passed_at_fd_3(tmp_path: Path,
                                                  bound_pair: list[socket.socket]) -> None:
    # The listen address below is a port nobody serves: with activation it must be ignored.
    ignored = free_udp_port()
    log = tmp_path / "server.log"
    process = launch_activated(bound_pair, "-m", "guardntp", "serve", "--listen",
                               f"127.0.0.1:{ignored}", "--state-dir", str(tmp_path / "s"),
                               log=log)
    try:
        for sock in bound_pair:
            host, port = sock.getsockname()[:2]
            wait_until_answering(port, host)
        text = log.read_text()
        assert f"using {len(bound_pair)} socket(s) from systemd" in text
        assert f"127.0.0.1:{ignored}" not in text
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.5)
            probe.sendto(bytes([0x23]) + bytes(47), ("127.0.0.1", ignored))
            with pytest.raises(OSError):  # refused or timed out: nothing listens there
                probe.recvfrom(64)
    finally:
        assert stop(process) == 0, log.read_text()


CHECK_SCRIPT = r"""
import os, socket, sys
from guardntp.server import SO_TIMESTAMPNS
from guardntp.systemd import ActivationError, inherited_sockets
try:
    sockets = inherited_sockets()
except ActivationError as error:
    print("error:", error)
    sys.exit(0)
sock = sockets[0]
print("timestamps", sock.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS),
      "blocking", sock.getblocking(), "inheritable", os.get_inheritable(sock.fileno()),
      "env", "LISTEN_FDS" in os.environ)
"""


def _run_check(sock: socket.socket, tmp_path: Path) -> str:
    log = tmp_path / "check.log"
    process = launch_activated([sock], "-c", CHECK_SCRIPT, log=log)
    process.wait(timeout=30)
    return log.read_text().strip()


def test_inherited_sockets_get_kernel_timestamps_and_are_not_passed_on(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockopt(socket.SOL_SOCKET, 35) == 0
        assert _run_check(sock, tmp_path) == \
            "timestamps 1 blocking False inheritable False env False"


def test_a_stream_socket_is_refused_with_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        out = _run_check(sock, tmp_path)
    assert out == ("error: LISTEN_FDS: descriptor 3 is not a UDP socket "
                   "(the .socket unit needs ListenDatagram=)")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (Debian package systemd)")
def test_under_systemd_socket_activate(tmp_path: Path) -> None:
    port = free_udp_port()
    log = tmp_path / "activate.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["systemd-socket-activate", "--datagram", "-l", f"127.0.0.1:{port}",
             sys.executable, "-m", "guardntp", "serve", "--state-dir", str(tmp_path / "s")],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
    try:
        # The first datagram makes systemd-socket-activate exec the server, which then
        # finds that datagram still queued on the socket and answers it.
        wait_until_answering(port, timeout_s=15)
        text = log.read_text()
        assert "using 1 socket(s) from systemd" in text
        assert "12300" not in text  # the embedded default's listen address was not bound
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_notify_sends_to_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(2)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert listener.recv(64) == b"READY=1"
    abstract = f"@guardntp-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + abstract[1:])
        listener.settimeout(2)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": abstract})
        assert listener.recv(64) == b"STOPPING=1"
    assert not systemd.notify("READY=1", {})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_the_shipped_units_are_consistent() -> None:
    service = (REPO_UNITS / "guardntp.service").read_text()
    socket_unit = (REPO_UNITS / "guardntp.socket").read_text()
    assert "ListenDatagram=" in socket_unit and "Timestamping=ns" in socket_unit
    assert "Requires=guardntp.socket" in service
    for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=guardntp",
                      "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                      "AmbientCapabilities=\n", "ExecReload=/bin/kill -HUP $MAINPID",
                      "Type=notify"):
        assert hardening in service + "\n", hardening
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(REPO_UNITS / "guardntp.socket"),
                                 str(REPO_UNITS / "guardntp.service")],
                                capture_output=True, text=True, timeout=60, check=False)
        problems = [line for line in result.stderr.splitlines()
                    if "guardntp" in line and "Command /usr/bin/guardntp" not in line]
        assert not problems, result.stderr
