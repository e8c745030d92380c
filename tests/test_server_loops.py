"""The server's two packet loops on real loopback sockets, through ``Server``:

* ``compiled``: ``guardntp/_fastlane.c`` (``fastlane.FastLane``), here with its own
  fast decisions off so every datagram reaches the test's ``decide`` (those are
  held to ``Pipeline.decide`` in ``tests/test_fastlane.py``);
* ``python``: the plain one-``recvmsg``-per-packet loop in ``guardntp/server.py``,
  which serves where the C module was not built, or with ``GUARDNTP_NO_FASTLANE=1``.

Both must be observably the same: what ``decide`` is told (source, port, kernel
receive time, arrival TTL), what is counted, what is sent. Each test queues
datagrams first and then runs one ``Server._on_datagrams``, as the event loop
would on a readable socket. Traffic stays on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest

from guardntp import fastlane
from guardntp import server as server_module
from guardntp.clock import ClockState
from guardntp.control.reports import format_stats
from guardntp.control.service import ControlCommands
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.netaddr import ListenSpec
from guardntp.responder import Responder
from guardntp.server import Server, open_socket
from guardntp.timesources.local import LocalClock
from guardntp.timestamps import ntp_to_unix_ns
from guardntp.verdicts import Reason
from guardntp.wire import Mode, NtpPacket, encode

CLOCK = ClockState(synchronized=True, stratum=2, refid=b"GPS\0", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=time.time_ns())

LOOPS = [pytest.param("compiled", marks=pytest.mark.skipif(
             not fastlane.available(),
             reason=f"compiled loop unavailable: {fastlane.unavailable_because()}")),
         "python"]


def request(xmt: int, version: int = 4, mode: int = Mode.CLIENT) -> bytes:
    return encode(NtpPacket(version=version, mode=mode, transmit_ts=xmt, poll=6))


class Rig:
    """A real ``Server`` on one loopback socket, the loop under test serving it, every
    ``decide`` call recorded, and one client socket."""

    def __init__(self, loop: str, monkeypatch: pytest.MonkeyPatch, host: str = "127.0.0.1",
                 sock: socket.socket | None = None, client_host: str | None = None,
                 **policy: object) -> None:
        if loop == "python":
            monkeypatch.setenv("GUARDNTP_NO_FASTLANE", "1")
        else:
            monkeypatch.delenv("GUARDNTP_NO_FASTLANE", raising=False)
        policy.setdefault("random_seed", 1)
        # One client socket is one source: let it through unless a test says otherwise.
        policy.setdefault("source_rate", 1e6)
        policy.setdefault("source_burst", 10**6)
        source = LocalClock()
        now = time.time_ns()
        self.pipeline = Pipeline(FilterPolicy(**policy),  # type: ignore[arg-type]
                                 Responder(CLOCK, now))
        self.inner_decide = self.pipeline.decide
        #: (packed, port, recv_ns, ttl, reason) of every decide call, in order.
        self.seen: list[tuple[bytes, int, int, int, Reason]] = []
        self.pipeline.decide = self.decide  # type: ignore[method-assign]
        lane_policy = self.pipeline.lane_policy
        self.pipeline.lane_policy = (  # type: ignore[method-assign]
            lambda: lane_policy().disabled())
        self.sock = sock if sock is not None else open_socket(ListenSpec(host, 0))
        self.port = self.sock.getsockname()[1]
        self.server = Server([self.sock], self.pipeline, source)
        assert (self.sock in self.server.batched) is (loop == "compiled")
        client_host = client_host or host
        family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
        self.client = socket.socket(family, socket.SOCK_DGRAM)
        self.client.bind((client_host, 0))
        self.client.settimeout(2)
        self.address = (client_host, self.port)

    def decide(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int,
               ttl: int = -1) -> tuple[Reason, bytes | None, object]:
        decision = self.inner_decide(data, packed, port, recv_ns, now_ns, ttl=ttl)
        self.seen.append((packed, port, recv_ns, ttl, decision[0]))
        return decision

    def send(self, datagrams: list[bytes], client: socket.socket | None = None) -> None:
        for data in datagrams:
            (client or self.client).sendto(data, self.address)
        time.sleep(0.05)   # all queued before the one wake-up below

    def serve(self) -> None:
        self.server._on_datagrams(self.sock)

    def replies(self, count: int, client: socket.socket | None = None) -> list[bytes]:
        return [(client or self.client).recv(4096) for _ in range(count)]

    def close(self) -> None:
        self.client.close()
        self.sock.close()


@pytest.fixture(params=LOOPS)
def loop(request):
    return request.param


@pytest.fixture
def rig(loop, monkeypatch):
    made = Rig(loop, monkeypatch)
    yield made
    made.close()


def v6_rig(loop: str, monkeypatch: pytest.MonkeyPatch) -> Rig:
    try:
        return Rig(loop, monkeypatch, host="::1")
    except (OSError, server_module.ListenError) as error:   # no IPv6 loopback here
        pytest.skip(f"no ::1: {error}")


# ---------------------------------------------------------------------- both loops alike


def test_a_decision_that_raises_drops_its_datagrams_not_the_server(rig, caplog):
    """A stage with a bug (here: decide raises on one request) costs that datagram
    (the compiled loop: its batch), counted and logged once; the server keeps serving."""
    poisoned = request(0xBAD)
    decide = rig.decide

    def failing(data, *args, **kwargs):   # type: ignore[no-untyped-def]
        if data == poisoned:
            raise RuntimeError("a stage with a bug")
        return decide(data, *args, **kwargs)

    rig.pipeline.decide = failing   # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="guardntp.server"):
        for _ in range(3):
            rig.send([poisoned])
            rig.serve()
    assert rig.server.decision_errors == 3
    stats = ControlCommands(rig.pipeline, rig.server, None, lambda: "").stats({}, 0)
    assert stats["decision_errors"] == 3
    assert "errors       3 decisions raised" in format_stats(stats)
    errors = [r for r in caplog.records if "decision failed" in r.getMessage()]
    assert len(errors) == 1 and "a stage with a bug" in errors[0].getMessage()
    rig.send([request(0x1234)])
    rig.serve()
    (reply,) = rig.replies(1)
    assert int.from_bytes(reply[24:32], "big") == 0x1234


def test_every_packet_is_counted_once_and_every_request_answered(rig):
    datagrams = [request(0x1000 + i) for i in range(200)]   # > 3 batches of 64
    rig.send(datagrams)
    rig.serve()
    assert (rig.server.truncated, rig.server.send_errors) == (0, 0)
    assert len(rig.seen) == 200
    assert rig.pipeline.counters.by_reason() == {"answered": 200}
    replies = rig.replies(200)
    origins = sorted(int.from_bytes(reply[24:32], "big") for reply in replies)
    assert origins == [0x1000 + i for i in range(200)]
    assert rig.pipeline.counters.bytes_in == 200 * 48
    assert rig.pipeline.counters.bytes_out == sum(len(reply) for reply in replies) == 200 * 48


def test_receive_timestamps_come_from_the_kernel(rig):
    before = time.time_ns()
    rig.send([request(7 + i) for i in range(10)])
    after = time.time_ns() - 40_000_000   # send() slept 50 ms after the last one
    rig.serve()
    stamps = [recv_ns for _, _, recv_ns, _, _ in rig.seen]
    assert len(stamps) == 10
    # The wall clock at serving time would be at least 40 ms past ``after``.
    assert all(before <= stamp <= after for stamp in stamps), (before, stamps, after)
    assert stamps == sorted(stamps)   # the kernel's arrival order
    for reply in rig.replies(10):
        receive_ns = ntp_to_unix_ns(int.from_bytes(reply[32:40], "big"), before)
        transmit_ns = ntp_to_unix_ns(int.from_bytes(reply[40:48], "big"), before)
        assert before - 1000 <= receive_ns <= after + 1000
        assert receive_ns + 40_000_000 <= transmit_ns   # stamped at the send


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
    rig.serve()
    assert rig.server.truncated == 1 and rig.server.send_errors == 0
    assert rig.pipeline.counters.by_reason() == {
        "answered": 5, "malformed": 4, "control_mode": 1, "private_mode": 1,
        "not_a_request": 1}
    assert [reason for *_, reason in rig.seen] == [
        Reason.ANSWERED, Reason.MALFORMED, Reason.CONTROL_MODE, Reason.ANSWERED,
        Reason.PRIVATE_MODE, Reason.NOT_A_REQUEST, Reason.ANSWERED, Reason.MALFORMED,
        Reason.MALFORMED, Reason.ANSWERED, Reason.MALFORMED, Reason.ANSWERED]
    replies = rig.replies(5)
    assert sorted(int.from_bytes(r[24:32], "big") for r in replies) == \
        [0x2000 + i for i in range(5)]
    assert all(len(r) == 48 for r in replies)
    rig.client.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rig.client.recv(4096)
    # bytes in: the truncated datagram counts the bytes kept of it.
    assert rig.pipeline.counters.bytes_in == sum(
        min(len(d), fastlane.RECV_BUFFER) for d in mixed)


def test_source_address_and_port_reach_the_filter(rig):
    rig.send([request(1)])
    rig.serve()
    packed, port, *_ = rig.seen[0]
    assert packed == socket.inet_aton("127.0.0.1")
    assert port == rig.client.getsockname()[1]


def test_kod_and_drop_paths_in_one_batch(loop, monkeypatch):
    rig = Rig(loop, monkeypatch, source_burst=1, source_rate=0.01, leak_one_in=0,
              kod_interval_s=3600.0)
    try:
        rig.send([request(0x3000 + i) for i in range(20)])
        rig.serve()
        assert rig.pipeline.counters.by_reason() == {"answered": 1, "rate_kod": 1,
                                                     "rate_limited": 18}
        replies = rig.replies(2)
        assert sorted(reply[1] for reply in replies) == [0, CLOCK.stratum]  # KoD, time
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

    unsigned = rig.inner_decide

    def decide(data, packed, port, recv_ns, now_ns, ttl=-1):
        reason, reply, _ = unsigned(data, packed, port, recv_ns, now_ns, ttl=ttl)
        return reason, reply, sign

    rig.inner_decide = decide
    rig.send([request(0x4000)])
    rig.serve()
    (reply,) = rig.replies(1)
    assert reply.endswith(b"SIGN")
    assert signed[0][40:48] != signed[0][32:40]   # the signer saw the stamped transmit
    assert signed[0][40:48] != request(0x4000)[40:48]


def test_nothing_waiting_is_not_an_error(rig):
    rig.serve()
    assert rig.seen == [] and rig.pipeline.counters.total() == 0


def test_ipv6(loop, monkeypatch):
    rig = v6_rig(loop, monkeypatch)
    try:
        rig.send([request(0x5000 + i) for i in range(3)])
        rig.serve()
        assert len(rig.seen) == 3
        packed, port, _, _, reason = rig.seen[0]
        assert packed == socket.inet_pton(socket.AF_INET6, "::1") and reason == Reason.ANSWERED
        assert port == rig.client.getsockname()[1]
        replies = rig.replies(3)
        assert sorted(int.from_bytes(r[24:32], "big") for r in replies) == [0x5000, 0x5001,
                                                                           0x5002]
    finally:
        rig.close()


def dual_stack_socket() -> socket.socket:
    """An IPv6 socket that also takes IPv4 (as systemd may pass one), set up as
    ``systemd.inherited_sockets`` does."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError as error:
        sock.close()
        pytest.skip(f"no dual-stack socket: {error}")
    sock.setsockopt(socket.SOL_SOCKET, server_module.SO_TIMESTAMPNS, 1)
    server_module.enable_arrival_ttl(sock)
    sock.setblocking(False)
    return sock


def test_ipv4_mapped_sources_on_a_dual_stack_socket(loop, monkeypatch):
    rig = Rig(loop, monkeypatch, sock=dual_stack_socket(), client_host="127.0.0.1")
    try:
        rig.send([request(9)])
        rig.serve()
        assert [seen[0] for seen in rig.seen] == [socket.inet_aton("127.0.0.1")]  # 4 bytes
        assert int.from_bytes(rig.replies(1)[0][24:32], "big") == 9
    finally:
        rig.close()


def test_the_server_says_which_loop_serves(monkeypatch, caplog):
    for no_fastlane in ((False, True) if fastlane.available() else (True,)):
        caplog.clear()
        if no_fastlane:
            monkeypatch.setenv("GUARDNTP_NO_FASTLANE", "1")
        else:
            monkeypatch.delenv("GUARDNTP_NO_FASTLANE", raising=False)
        sock = open_socket(ListenSpec("127.0.0.1", 0))
        try:
            source = LocalClock()
            now = time.time_ns()
            pipeline = Pipeline(FilterPolicy(), Responder(source.state(now), now))
            with caplog.at_level(logging.INFO, logger="guardntp.server"):
                server = Server([sock], pipeline, source)
            lines = [(r.levelno, r.getMessage()) for r in caplog.records
                     if "packet loop" in r.getMessage()]
            if no_fastlane:
                assert sock not in server.batched
                ((level, message),) = lines
                assert level == logging.WARNING
                assert "plain Python recvmsg loop is serving" in message
                assert fastlane.unavailable_because() in message
            else:
                assert isinstance(server.batched[sock], fastlane.FastLane)
                assert lines == [(logging.INFO, "packet loop: compiled (guardntp._fastlane)")]
        finally:
            sock.close()


# ---------------------------------------------------------------------- arrival TTL


def test_server_sockets_ask_for_the_arrival_ttl():
    """What both loops rely on: ``open_socket`` turns the TTL control messages on."""
    sock = open_socket(ListenSpec("127.0.0.1", 0))
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, server_module.IP_RECVTTL) == 1
    finally:
        sock.close()
    try:
        sock = open_socket(ListenSpec("::1", 0))
    except server_module.ListenError as error:
        pytest.skip(f"no ::1: {error}")
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, server_module.IPV6_RECVHOPLIMIT) == 1
    finally:
        sock.close()


def test_decide_is_told_each_datagrams_ipv4_ttl(loop, monkeypatch):
    """Both loops read the TTL control message the socket asked for (IP_RECVTTL)."""
    rig = Rig(loop, monkeypatch)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.settimeout(2)
    try:
        rig.client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 37)
        default_ttl = other.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)   # 64 on Linux
        assert default_ttl not in (37, -1)
        rig.send([request(1), request(2)])
        rig.send([request(3)], client=other)
        rig.serve()
        assert [(seen[3], seen[4]) for seen in rig.seen] == [
            (37, Reason.ANSWERED), (37, Reason.ANSWERED), (default_ttl, Reason.ANSWERED)]
        assert len(rig.replies(2)) == 2 and len(rig.replies(1, client=other)) == 1
    finally:
        other.close()
        rig.close()


def test_decide_is_told_each_datagrams_ipv6_hop_limit(loop, monkeypatch):
    rig = v6_rig(loop, monkeypatch)
    try:
        default_hops = rig.client.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
        assert default_hops not in (37, -1)   # 64 on Linux
        rig.send([request(1)])
        rig.client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 37)
        rig.send([request(2)])
        rig.serve()
        assert [seen[3] for seen in rig.seen] == [default_hops, 37]
        assert len(rig.replies(2)) == 2
    finally:
        rig.close()


def test_decide_is_told_the_ttl_of_ipv4_on_a_dual_stack_socket(loop, monkeypatch):
    rig = Rig(loop, monkeypatch, sock=dual_stack_socket(), client_host="127.0.0.1")
    try:
        rig.client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 37)
        rig.send([request(1)])
        rig.serve()
        assert [(seen[0], seen[3]) for seen in rig.seen] == [(socket.inet_aton("127.0.0.1"), 37)]
    finally:
        rig.close()


def test_without_the_ttl_option_the_ttl_is_unknown_and_the_request_answered(monkeypatch):
    """A socket nobody asked for TTLs (the kernel refused, or it came from elsewhere):
    the Python loop tells ``decide`` -1 and serves as before."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, server_module.SO_TIMESTAMPNS, 1)
    sock.setblocking(False)
    rig = Rig("python", monkeypatch, sock=sock)
    try:
        rig.send([request(1)])
        rig.serve()
        assert [(seen[3], seen[4]) for seen in rig.seen] == [(-1, Reason.ANSWERED)]
        assert len(rig.replies(1)) == 1
    finally:
        rig.close()


class RefusingSocket:
    """Stands in for a socket whose kernel refuses every option."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.asked: list[tuple[int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.asked.append((level, option))
        raise OSError(92, "Protocol not available")


def test_a_refused_ttl_option_does_not_stop_the_server(caplog):
    with caplog.at_level(logging.DEBUG, logger="guardntp.server"):
        v4, v6 = RefusingSocket(socket.AF_INET), RefusingSocket(socket.AF_INET6)
        server_module.enable_arrival_ttl(v4)  # type: ignore[arg-type]
        server_module.enable_arrival_ttl(v6)  # type: ignore[arg-type]
    assert v4.asked == [(socket.IPPROTO_IP, server_module.IP_RECVTTL)]
    # IPv6: the hop limit, and the IPv4 TTL for IPv4-mapped traffic on a dual-stack socket.
    assert set(v6.asked) == {(socket.IPPROTO_IPV6, server_module.IPV6_RECVHOPLIMIT),
                             (socket.IPPROTO_IP, server_module.IP_RECVTTL)}
    assert sum("IP_RECVTTL" in r.getMessage() for r in caplog.records) == 2
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_parse_ancillary():
    stamp = server_module._TIMESPEC.pack(1_700_000_000, 123)
    ttl = struct.pack("@i", 37)
    assert server_module.parse_ancillary([]) == (None, -1)
    assert server_module.parse_ancillary([
        (socket.SOL_SOCKET, server_module.SCM_TIMESTAMPNS, stamp),
        (socket.IPPROTO_IP, server_module.IP_TTL, ttl)]) == (1_700_000_000_000_000_123, 37)
    assert server_module.parse_ancillary([
        (socket.IPPROTO_IPV6, server_module.IPV6_HOPLIMIT, ttl)]) == (None, 37)
    # Other messages, and short ones, are not taken for either.
    assert server_module.parse_ancillary([
        (socket.IPPROTO_IP, server_module.IP_TTL, b"\x25"),
        (socket.IPPROTO_IPV6, server_module.IP_TTL, ttl),
        (socket.SOL_SOCKET, server_module.SCM_TIMESTAMPNS, stamp[:8])]) == (None, -1)
    assert server_module.kernel_receive_ns([
        (socket.SOL_SOCKET, server_module.SCM_TIMESTAMPNS, stamp)]) == 1_700_000_000_000_000_123
