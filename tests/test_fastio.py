"""Batched recvmmsg/sendmmsg I/O on real loopback sockets, for both loops: Python's
(``guardntp/fastio.py``) and the compiled one (``guardntp/fastlane.py``, here with its
own fast decisions off so every packet reaches the test's ``decide``; those are
tested in ``tests/test_fastlane.py``).

Each test queues datagrams first and then runs one ``pump``, so the batch a test
means is the batch the kernel hands over. Traffic stays on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import socket
import time

import pytest

from guardntp import fastio, fastlane
from guardntp.clock import ClockState
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.netaddr import ListenSpec
from guardntp.responder import Responder
from guardntp.server import Server, open_socket
from guardntp.timestamps import NS_PER_S, ntp_to_unix_ns
from guardntp.verdicts import Reason
from guardntp.wire import Mode, NtpPacket, encode

pytestmark = pytest.mark.skipif(not fastio.available(), reason="recvmmsg/sendmmsg unavailable")
IMPLS = ["python", "compiled"] if fastlane.available() else ["python"]

CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=time.time_ns())
#: What ``wall_ns`` returns in these tests: a receive time taken from it, not from the
#: kernel, would show up as this value (the year 2001) in the reply.
FALLBACK_WALL_NS = 1_000_000_000 * NS_PER_S


def request(xmt: int, version: int = 4, mode: int = Mode.CLIENT) -> bytes:
    return encode(NtpPacket(version=version, mode=mode, transmit_ts=xmt, poll=6))


class Rig:
    """A pipeline, a bound server socket, its BatchSocket and one client socket."""

    def __init__(self, host: str = "127.0.0.1", impl: str = "python", **policy: object) -> None:
        policy.setdefault("random_seed", 1)
        # One client socket is one source: let it through unless a test says otherwise.
        policy.setdefault("source_rate", 1e6)
        policy.setdefault("source_burst", 10**6)
        now = time.time_ns()
        self.pipeline = Pipeline(FilterPolicy(**policy),  # type: ignore[arg-type]
                                 Responder(CLOCK, now))
        self.server_sock = open_socket(ListenSpec(host, 0))
        self.address = self.server_sock.getsockname()[:2]
        self.impl = impl
        self.inner_decide = self.pipeline.decide
        if impl == "compiled":
            self.lane = fastlane.FastLane(self.server_sock, self.pipeline)
            config = self.pipeline.fast_lane_config()
            config.update(decide=self.decide, enabled=0)
            self.lane.lane.configure(config)
            self.lane._version = self.pipeline.config_version
        else:
            self.batch = fastio.BatchSocket(self.server_sock)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.client = socket.socket(family, socket.SOCK_DGRAM)
        self.client.bind((host, 0))
        self.client.settimeout(2)
        self.seen: list[tuple[bytes, int, int, Reason]] = []

    def decide(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int
               ) -> tuple[Reason, bytes | None, object]:
        decision = self.inner_decide(data, packed, port, recv_ns, now_ns)
        self.seen.append((packed, port, recv_ns, decision[0]))
        return decision

    def send(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.client.sendto(data, self.address)
        time.sleep(0.05)   # all queued before the one pump below

    def pump(self, budget: int = 10_000) -> tuple[int, int, int]:
        if self.impl == "compiled":
            return self.lane.pump(self.transmit, lambda: FALLBACK_WALL_NS, budget)
        return self.batch.pump(self.decide, self.pipeline.counters,  # type: ignore[arg-type]
                               self.transmit, lambda: FALLBACK_WALL_NS, budget)

    def transmit(self) -> bytes:
        return self.pipeline.responder.served_ntp(time.time_ns()).to_bytes(8, "big")

    def replies(self, count: int) -> list[bytes]:
        return [self.client.recv(4096) for _ in range(count)]

    def close(self) -> None:
        self.client.close()
        self.server_sock.close()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def rig(impl):
    made = Rig(impl=impl)
    yield made
    made.close()


def test_every_packet_is_counted_once_and_every_request_answered(rig):
    datagrams = [request(0x1000 + i) for i in range(200)]   # > 3 batches of 64
    rig.send(datagrams)
    handled, truncated, send_errors = rig.pump()
    assert (handled, truncated, send_errors) == (200, 0, 0)
    assert rig.pipeline.counters.total() == 200
    assert rig.pipeline.counters.by_reason() == {"answered": 200}
    replies = rig.replies(200)
    origins = sorted(int.from_bytes(reply[24:32], "big") for reply in replies)
    assert origins == [0x1000 + i for i in range(200)]
    assert rig.pipeline.counters.bytes_in == 200 * 48
    assert rig.pipeline.counters.bytes_out == sum(len(reply) for reply in replies) == 200 * 48


def test_receive_timestamps_come_from_the_kernel(rig):
    before = time.time_ns()
    rig.send([request(7 + i) for i in range(10)])
    after = time.time_ns()
    rig.pump()
    stamps = [recv_ns for _, _, recv_ns, _ in rig.seen]
    assert len(stamps) == 10
    assert all(before <= stamp <= after for stamp in stamps), (before, stamps, after)
    assert stamps == sorted(stamps)   # the kernel's arrival order
    for reply in rig.replies(10):
        receive_ns = ntp_to_unix_ns(int.from_bytes(reply[32:40], "big"), before)
        transmit_ns = ntp_to_unix_ns(int.from_bytes(reply[40:48], "big"), before)
        assert before - 1000 <= receive_ns <= after + 1000
        assert receive_ns <= transmit_ns   # stamped at the send, after the receive


def test_a_batch_of_good_and_bad_packets(rig):
    good = [request(0x2000 + i) for i in range(5)]
    bad = [
        b"\x23" + bytes(30),                        # short: malformed
        request(1, mode=Mode.CONTROL),              # mode 6
        request(2, mode=Mode.PRIVATE),              # mode 7
        request(3, mode=Mode.SERVER),               # a response
        request(4) + b"\0" * 3,                     # not a multiple of 4: malformed
        request(5) + bytes(3000),                   # longer than the buffer: truncated
        b"",                                        # empty datagram
    ]
    mixed = [good[0], bad[0], bad[1], good[1], bad[2], bad[3], good[2], bad[4], bad[5],
             good[3], bad[6], good[4]]
    rig.send(mixed)
    handled, truncated, send_errors = rig.pump()
    assert handled == len(mixed) and truncated == 1 and send_errors == 0
    reasons = rig.pipeline.counters.by_reason()
    assert reasons == {"answered": 5, "malformed": 4, "control_mode": 1, "private_mode": 1,
                       "not_a_request": 1}
    assert [reason for _, _, _, reason in rig.seen] == [
        Reason.ANSWERED, Reason.MALFORMED, Reason.CONTROL_MODE, Reason.ANSWERED,
        Reason.PRIVATE_MODE, Reason.NOT_A_REQUEST, Reason.ANSWERED, Reason.MALFORMED,
        Reason.MALFORMED, Reason.ANSWERED, Reason.MALFORMED, Reason.ANSWERED]
    replies = rig.replies(5)
    assert sorted(int.from_bytes(r[24:32], "big") for r in replies) == \
        [0x2000 + i for i in range(5)]
    assert all(len(r) == 48 for r in replies)
    with pytest.raises(TimeoutError):
        rig.client.settimeout(0.2)
        rig.client.recv(4096)
    # bytes in: the truncated datagram counts the 2048 bytes kept of it.
    assert rig.pipeline.counters.bytes_in == sum(
        min(len(d), fastio.RECV_BUFFER) for d in mixed)


def test_source_address_and_port_reach_the_filter(rig):
    rig.send([request(1)])
    rig.pump()
    packed, port, _, _ = rig.seen[0]
    assert packed == socket.inet_aton("127.0.0.1")
    assert port == rig.client.getsockname()[1]


def test_kod_and_drop_paths_in_one_batch(impl):
    rig = Rig(impl=impl, source_burst=1, source_rate=0.01, leak_one_in=0, kod_interval_s=3600.0)
    try:
        rig.send([request(0x3000 + i) for i in range(20)])
        rig.pump()
        assert rig.pipeline.counters.by_reason() == {"answered": 1, "rate_kod": 1,
                                                     "rate_limited": 18}
        replies = rig.replies(2)
        strata = sorted(reply[1] for reply in replies)
        assert strata == [0, CLOCK.stratum]              # one KoD, one time reply
        kod = next(reply for reply in replies if reply[1] == 0)
        assert kod[12:16] == b"RATE"
        assert kod[40:48] == kod[24:32]                   # a KoD carries no server time
        assert rig.pipeline.counters.bytes_out == 96
    finally:
        rig.close()


def test_signer_runs_after_the_transmit_stamp(rig):
    signed: list[bytes] = []

    def sign(reply: bytes) -> bytes:
        signed.append(reply)
        return reply[:44] + b"SIGN"          # same length: replaces the transmit fraction

    def decide(data, packed, port, recv_ns, now_ns):
        reason, reply, _ = rig.pipeline.decide(data, packed, port, recv_ns, now_ns)
        return reason, reply, sign

    rig.inner_decide = decide
    rig.send([request(0x4000)])
    rig.pump()
    (reply,) = rig.replies(1)
    assert reply.endswith(b"SIGN")
    assert signed[0][40:48] != signed[0][32:40]   # the signer saw the stamped transmit


def test_budget_bounds_one_pump(impl):
    rig = Rig(impl=impl)
    try:
        rig.send([request(i) for i in range(150)])
        handled, _, _ = rig.pump(budget=64)
        assert handled == 64
        handled, _, _ = rig.pump(budget=1000)
        assert handled == 86
        assert rig.pipeline.counters.total() == 150
    finally:
        rig.close()


def test_nothing_waiting_is_not_an_error(rig):
    assert rig.pump() == (0, 0, 0)


def test_ipv6(impl):
    try:
        rig = Rig("::1", impl=impl)
    except Exception as error:   # no IPv6 loopback in this environment
        pytest.skip(f"no ::1: {error}")
    try:
        rig.send([request(0x5000 + i) for i in range(3)])
        assert rig.pump()[0] == 3
        packed, port, _, reason = rig.seen[0]
        assert packed == socket.inet_pton(socket.AF_INET6, "::1") and reason == Reason.ANSWERED
        assert port == rig.client.getsockname()[1]
        replies = rig.replies(3)
        assert sorted(int.from_bytes(r[24:32], "big") for r in replies) == [0x5000, 0x5001,
                                                                           0x5002]
    finally:
        rig.close()


def test_ipv4_mapped_sources_on_a_dual_stack_socket():
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::ffff:127.0.0.1", 0))
    except OSError as error:
        server.close()
        pytest.skip(f"no dual-stack loopback: {error}")
    server.setsockopt(socket.SOL_SOCKET, fastio.SO_TIMESTAMPNS, 1)
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    try:
        seen: list[bytes] = []
        now = time.time_ns()
        pipeline = Pipeline(FilterPolicy(), Responder(CLOCK, now))

        def decide(data, packed, port, recv_ns, now_ns):
            seen.append(packed)
            return pipeline.decide(data, packed, port, recv_ns, now_ns)

        client.sendto(request(9), ("127.0.0.1", server.getsockname()[1]))
        time.sleep(0.05)
        batch = fastio.BatchSocket(server)
        batch.pump(decide, pipeline.counters, lambda: bytes(8), time.time_ns, 10)
        assert seen == [socket.inet_aton("127.0.0.1")]   # 4 bytes, like an IPv4 socket
        assert int.from_bytes(client.recv(100)[24:32], "big") == 9
    finally:
        client.close()
        server.close()


def test_server_uses_batches_and_falls_back_without_them(monkeypatch):
    from guardntp.timesources.local import LocalClock

    for setting, expected in (("", fastlane.FastLane if fastlane.available() else
                                fastio.BatchSocket),
                              ("GUARDNTP_NO_FASTLANE", fastio.BatchSocket),
                              ("GUARDNTP_NO_BATCH_IO", None)):
        if setting:
            monkeypatch.setenv(setting, "1")
        disabled = expected is None
        sock = open_socket(ListenSpec("127.0.0.1", 0))
        source = LocalClock()
        now = time.time_ns()
        pipeline = Pipeline(FilterPolicy(), Responder(source.state(now), now))
        server = Server([sock], pipeline, source)
        assert (sock in server.batched) is not disabled
        assert expected is None or type(server.batched[sock]) is expected
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(2)
        try:
            for i in range(5):
                client.sendto(request(0x6000 + i), sock.getsockname())
            time.sleep(0.05)
            server._on_datagrams(sock)
            assert pipeline.counters.by_reason() == {"answered": 5}
            assert sorted(int.from_bytes(client.recv(100)[24:32], "big") for _ in range(5)) \
                == [0x6000 + i for i in range(5)]
            assert pipeline.counters.bytes_out == pipeline.counters.bytes_in == 5 * 48
        finally:
            client.close()
            sock.close()


def test_transmit_stamp_is_fresh_for_each_chunk_of_replies(rig):
    rig.send([request(0x7000 + i) for i in range(fastio.BATCH_SIZE)])
    rig.pump()
    transmits = {reply[40:48] for reply in rig.replies(fastio.BATCH_SIZE)}
    chunks = -(-fastio.BATCH_SIZE // fastio.STAMP_EVERY)
    assert 2 <= len(transmits) <= chunks
