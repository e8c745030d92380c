"""``--workers``: reuseport steering by source prefix, budgets, signals to every worker.

Sources are real loopback addresses (any 127.x.y.z can be bound on Linux), so the
kernel's own reuseport selection is what is tested.
"""

from __future__ import annotations

import ipaddress
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_udp_port, wait_until_answering

from guardntp.filter.policy import FilterPolicy
from guardntp.netaddr import ListenSpec
from guardntp.wire import Mode, NtpPacket, encode
from guardntp.workers import (
    SKF_NET_OFF,
    open_worker_sockets,
    split_budgets,
    steering_program,
    worker_for,
)


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


@pytest.mark.slow
def test_serve_with_workers_answers_and_relays_signals(tmp_path):
    port = free_udp_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{port}",
             "--state-dir", str(tmp_path / "state"), "--workers", "2"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until_answering(port)
        for i in range(1, 40):      # sources in many /24s: both workers answer
            reply = _query(f"127.{i}.{i}.9", port, 0x1234_0000 + i)
            assert int.from_bytes(reply[24:32], "big") == 0x1234_0000 + i
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log_path.read_text().count("SIGHUP: reloading") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log_path.read_text().count("SIGHUP: reloading") == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        log = log_path.read_text()
        assert log.count("stopped:") == 2
        answered = [int(line.split("(time ")[1].split(",")[0])
                    for line in log.splitlines() if "stopped:" in line]
        assert sum(answered) >= 39 and all(count > 0 for count in answered), answered
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", "serve", "--listen", f"127.0.0.1:{free_udp_port()}",
         "--state-dir", str(not_a_directory / "state"), "--workers", "2"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode != 0
    assert "worker 0" in result.stderr and "state directory" in result.stderr
