"""``--workers``: reuseport steering by source prefix, budgets, signals to every worker.

Sources are real loopback addresses (any 127.x.y.z can be bound on Linux), so the
kernel's own reuseport selection is what is tested.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, free_tcp_port, free_udp_port, wait_until_answering

from guardntp.daemon.steering import (
    SKF_NET_OFF,
    open_worker_sockets,
    split_budgets,
    steering_program,
    worker_for,
)
from guardntp.filter.policy import FilterPolicy
from guardntp.netaddr import ListenSpec
from guardntp.wire import Mode, NtpPacket, encode


def run_classic_bpf(program, ip_header: bytes) -> int:
    """A classic BPF interpreter for the opcodes the steering program uses."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (0x20, 0x30):                          # ld / ldb [net + off]
            offset = k - SKF_NET_OFF
            size = 4 if code == 0x20 else 1
            a = int.from_bytes(ip_header[offset:offset + size], "big")
        elif code == 0x74:
            a = (a >> k) & 0xFFFF_FFFF
        elif code == 0x54:
            a &= k
        elif code == 0x24:
            a = (a * k) & 0xFFFF_FFFF
        elif code == 0xAC:
            a ^= x
        elif code == 0x94:
            a %= k
        elif code == 0x07:
            x = a
        elif code == 0x05:
            pc += k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x16:
            return a
        else:
            raise AssertionError(f"opcode {code:#x}")


def ip_header(packed: bytes) -> bytes:
    if len(packed) == 4:
        return bytes([0x45]) + bytes(11) + packed + bytes([127, 0, 0, 1])
    return bytes([0x60]) + bytes(7) + packed + bytes(15) + b"\1"


@pytest.mark.parametrize("v4_bits,v6_bits,workers", [(24, 56, 2), (24, 56, 3), (16, 48, 4),
                                                    (32, 64, 5), (0, 0, 2), (20, 40, 7)])
def test_the_bpf_program_and_its_python_mirror_agree(v4_bits, v6_bits, workers):
    program = steering_program(v4_bits, v6_bits, workers)
    rng = random.Random(v4_bits * 1000 + workers)
    for _ in range(300):
        for width in (4, 16):
            packed = rng.randbytes(width)
            expected = worker_for(packed, v4_bits, v6_bits, workers)
            assert run_classic_bpf(program, ip_header(packed)) == expected
            assert 0 <= expected < workers


def test_a_prefix_stays_in_one_worker_and_prefixes_spread():
    picks = {worker_for(bytes([198, 51, 100, host]), 24, 56, 2) for host in range(256)}
    assert len(picks) == 1
    spread = [worker_for(ipaddress.IPv4Address(f"10.{i >> 8}.{i & 255}.1").packed, 24, 56, 4)
              for i in range(4000)]
    assert all(800 < spread.count(w) < 1200 for w in range(4)), [spread.count(w)
                                                                  for w in range(4)]
    v6 = {worker_for(ipaddress.IPv6Address(f"2001:db8:0:100::{i:x}").packed, 24, 56, 3)
          for i in range(1, 200)}
    assert len(v6) == 1   # one /56 (and so its /64s): one worker


def test_budgets_are_divided_among_workers():
    policy = FilterPolicy(global_reply_rate=250_000.0, global_reply_burst=25_000,
                          kod_rate=1000.0, kod_burst=1000)
    assert split_budgets(policy, 1) is policy
    shared = split_budgets(policy, 4)
    assert (shared.global_reply_rate, shared.global_reply_burst) == (62_500.0, 6250)
    assert (shared.kod_rate, shared.kod_burst) == (250.0, 250)
    assert shared.source_rate == policy.source_rate


def test_the_kernel_steers_each_source_prefix_to_its_worker():
    port = free_udp_port()
    workers = 3
    per_worker = open_worker_sockets((ListenSpec("127.0.0.1", port),), workers, FilterPolicy())
    clients = []
    try:
        sources = [f"127.{a}.{b}.{host}" for a in (0, 1, 7) for b in range(0, 250, 31)
                   for host in (2, 100)]
        for source in sources:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind((source, 0))
            client.sendto(source.encode(), ("127.0.0.1", port))
            clients.append(client)
        time.sleep(0.1)
        received = 0
        for worker, (sock,) in enumerate(per_worker):
            while True:
                try:
                    data = sock.recv(100)
                except BlockingIOError:
                    break
                received += 1
                source = data.decode()
                assert worker == worker_for(socket.inet_aton(source), 24, 56, workers), source
        assert received == len(sources)
    finally:
        for client in clients:
            client.close()
        for sockets in per_worker:
            for sock in sockets:
                sock.close()


def _query(source: str, port: int, xmt: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((source, 0))
        client.settimeout(10)   # a worker may still be starting on a busy machine
        client.sendto(encode(NtpPacket(version=4, mode=Mode.CLIENT, transmit_ts=xmt)),
                      ("127.0.0.1", port))
        return client.recv(100)


def _notify_socket(directory) -> socket.socket:
    """A stand-in for systemd's notify socket that records each sender's pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(0.2)
    return sock


def _notices(sock: socket.socket) -> list[tuple[int, str]]:
    """(sender pid, message) for every notice received so far."""
    received = []
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return received
        pid = next(struct.unpack("3i", cdata)[0] for level, kind, cdata in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        received.append((pid, data.decode()))


@pytest.mark.slow
def test_workers_are_one_server_to_the_operator_and_to_systemd(tmp_path):
    port, metrics_port = free_udp_port(), free_tcp_port()
    state_dir = tmp_path / "state"
    log_path = tmp_path / "serve.log"
    notify = _notify_socket(tmp_path)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{port}",
             "--state-dir", str(state_dir), "--workers", "2",
             "--metrics", f"127.0.0.1:{metrics_port}"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        wait_until_answering(port)
        sources = [f"127.{i}.{i}.9" for i in range(1, 40)]   # many /24s: both workers
        for i, source in enumerate(sources, start=1):
            reply = _query(source, port, 0x1234_0000 + i)
            assert int.from_bytes(reply[24:32], "big") == 0x1234_0000 + i
        answered = 40   # with wait_until_answering's first answer
        assert {worker_for(ipaddress.IPv4Address(s).packed, 24, 56, 2) for s in sources} == {0, 1}

        stats = _cli_json(state_dir, "stats")
        assert stats["workers"] == 2 and stats["workers_answered"] == 2
        assert stats["verdicts"]["time"] == answered
        clients = _cli_json(state_dir, "clients", "--limit", "100")
        assert clients["total"] == answered
        assert {row["source"] for row in clients["clients"]} == {*sources, "127.0.0.1"}
        scrape = _scrape(metrics_port)
        assert scrape['guardntp_packets_total{reason="answered",verdict="time",version="4"}'] \
            == answered
        assert scrape['guardntp_table_entries{table="sources"}'] == answered

        # A second instance on the same port is refused, workers or not.
        for extra in (["--workers", "2"], []):
            second = subprocess.run(
                [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{port}",
                 "--state-dir", str(tmp_path / "second"), *extra],
                capture_output=True, text=True, timeout=60, cwd=REPO)
            assert second.returncode != 0, second.stderr
            assert "address already in use" in second.stderr
            assert "Traceback" not in second.stderr

        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log_path.read_text().count("SIGHUP: reloading") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log_path.read_text().count("SIGHUP: reloading") == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        log = log_path.read_text()
        stopped = [line for line in log.splitlines() if "stopped:" in line]
        assert len(stopped) == 1, stopped
        assert f"stopped: {answered} packets (time {answered}," in stopped[0]
        assert "from 2 workers" in stopped[0]
        notices = _notices(notify)
        assert {pid for pid, _ in notices} == {process.pid}, notices
        states = [message.split("\n")[0] for _, message in notices]
        assert states[0] == "READY=1" and states[-1] == "STOPPING=1", states
        assert "RELOADING=1" in states
    finally:
        notify.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def _cli_json(state_dir, command: str, *extra: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", command, "--state-dir", str(state_dir), "--json",
         *extra],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_a_worker_that_cannot_start_stops_the_server(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{free_udp_port()}",
         "--state-dir", str(not_a_directory / "state"), "--workers", "2"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode != 0
    assert "worker 0" in result.stderr and "state directory" in result.stderr
