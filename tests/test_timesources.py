"""Time sources: the kernel + chronyd view, the upstream poller, the local clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    chronyd_query,
    chronyd_running,
    free_udp_port,
    guardntp_server,
    needs_chronyd,
    parse_chronyd_offset,
    wait_until_answering,
)

from guardntp import client
from guardntp.clock import ClockState
from guardntp.responder import Responder
from guardntp.timesources import refid_bytes
from guardntp.timesources.kernel import STA_INS, STA_UNSYNC, KernelClock, read_kernel_clock
from guardntp.timesources.system import SystemClock, clock_state_from, parse_chronyc_tracking
from guardntp.timesources.upstream import Measurement, Upstream, UpstreamClock, parse_upstream
from guardntp.timesources.upstream import clock_state_from as upstream_state
from guardntp.timestamps import NS_PER_S, unix_ns_to_ntp
from guardntp.wire import Leap, NtpPacket

NOW = 1_800_000_000 * NS_PER_S
REAL_TRACKING = ("7F7F0101,,8,1795294628.107179862,0.000000000,0.000000000,0.000000000,0.000,"
                 "0.000,0.000,0.001500000,0.000250000,0.0,Normal")
SYNCED = KernelClock(state=0, status=0, maxerror_us=1500, esterror_us=20)


def test_parse_chronyc_tracking_line_from_chrony_4_3():
    tracking = parse_chronyc_tracking(REAL_TRACKING)
    assert tracking.refid == bytes([127, 127, 1, 1]) and tracking.stratum == 8
    assert tracking.reference_unix_ns == 1_795_294_628_107_179_862
    assert tracking.root_delay_ns == 1_500_000 and tracking.root_dispersion_ns == 250_000
    assert tracking.leap is Leap.NONE and tracking.synchronized


def test_parse_chronyc_tracking_rejects_garbage():
    with pytest.raises(ValueError):
        parse_chronyc_tracking("506 Cannot talk to daemon")


def test_unsynchronised_kernel_means_li3_whatever_chronyd_says():
    kernel = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=16_000_000, esterror_us=0)
    state = clock_state_from(kernel, parse_chronyc_tracking(REAL_TRACKING), 2, b"\0" * 4,
                             -20, NOW)
    assert not state.synchronized and state.wire_leap is Leap.UNSYNCHRONIZED
    assert state.wire_stratum == 0


def test_synchronised_kernel_with_chronyd_serves_chronyds_stratum_and_refid():
    state = clock_state_from(SYNCED, parse_chronyc_tracking(REAL_TRACKING), 2, b"\0" * 4, -20,
                             NOW)
    assert state.synchronized and state.stratum == 8 and state.refid == bytes([127, 127, 1, 1])
    assert state.root_delay_ns == 1_500_000


def test_synchronised_kernel_without_chronyd_uses_configuration_and_leap_flags():
    kernel = KernelClock(state=1, status=STA_INS, maxerror_us=3000, esterror_us=10)
    state = clock_state_from(kernel, None, 3, refid_bytes("192.0.2.1"), -20, NOW)
    assert state.stratum == 3 and state.refid == bytes([192, 0, 2, 1])
    assert state.leap is Leap.INSERT_SECOND and state.root_dispersion_ns == 3_000_000


def test_read_kernel_clock_on_this_machine():
    kernel = read_kernel_clock()   # read-only adjtimex: no privilege needed
    assert kernel.maxerror_us >= 0 and 0 <= kernel.state <= 5


def test_refid_from_config():
    assert refid_bytes("GPS") == b"GPS\0"
    assert refid_bytes("") == b"\0\0\0\0"
    with pytest.raises(ValueError):
        refid_bytes("TOOLONG")


@needs_chronyd
def test_system_source_reads_a_real_chronyd(tmp_path: Path):
    directory = tmp_path / "chrony"
    with chronyd_running(directory, f"port 0\nlocal stratum 7\n"
                                    f"bindcmdaddress {directory}/chronyd.sock"):
        source = SystemClock(chronyc_socket=str(directory / "chronyd.sock"))
        for _ in range(50):
            source._refresh_tracking(NOW)
            if source._tracking is not None:
                break
            import time
            time.sleep(0.1)
        assert source._tracking is not None and source._tracking.stratum == 7
        state = clock_state_from(SYNCED, source._tracking, 2, b"\0" * 4, -20, NOW)
        assert state.stratum == 7


def test_system_clock_served_on_this_machine_matches_the_kernel(tmp_path: Path):
    """Here the kernel says "unsynchronised" (no NTP daemon disciplines it), so replies
    must be LI=3 — and our client must refuse to take time from them."""
    synced = read_kernel_clock().synchronized
    with guardntp_server(tmp_path, "--clock", "system", wait=False) as server:
        for _ in range(100):
            try:
                best, _ = client.query("127.0.0.1", server.port, timeout_s=0.3)
                assert synced, "served time although the kernel is unsynchronised"
                break
            except client.BogusReply as error:
                assert not synced and "not synchronised" in str(error)
                break
            except OSError:   # not listening yet (refused) or timed out
                import time
                time.sleep(0.1)
        else:
            pytest.fail("server never answered")


# ----------------------------------------------------------------------------- upstream

def _measurement(stratum=2, offset_ns=0, taken=NOW, address="192.0.2.10"):
    packet = NtpPacket(stratum=stratum, root_delay=1 << 10, root_dispersion=1 << 9)
    return Measurement(Upstream(address), address, client.Sample(offset_ns, 2_000_000, packet),
                       taken)


def test_upstream_state_is_stratum_plus_one_refid_address():
    state = upstream_state(_measurement(), NOW + NS_PER_S, 1024 * NS_PER_S, 0, -20)
    assert state.synchronized and state.stratum == 3 and state.refid == bytes([192, 0, 2, 10])


def test_upstream_lost_after_configured_time_goes_li3():
    state = upstream_state(_measurement(), NOW + 2000 * NS_PER_S, 1024 * NS_PER_S, 0, -20)
    assert not state.synchronized and state.wire_leap is Leap.UNSYNCHRONIZED
    assert not upstream_state(None, NOW, NS_PER_S, 0, -20).synchronized


def test_upstream_offset_is_applied_to_served_time_not_to_the_clock():
    state = upstream_state(_measurement(), NOW, 1024 * NS_PER_S, 30 * NS_PER_S, -20)
    responder = Responder(state, NOW)
    assert responder.served_ntp(NOW) == unix_ns_to_ntp(NOW + 30 * NS_PER_S)


def test_upstream_never_steps_without_permission():
    source = UpstreamClock([Upstream("127.0.0.1", 1)], allow_step=False)
    assert source._maybe_step(60 * NS_PER_S) is False
    assert source._maybe_step(1 * NS_PER_S) is False


def test_parse_upstream():
    assert parse_upstream("pool.ntp.org") == Upstream("pool.ntp.org", 123)
    assert parse_upstream("127.0.0.1:1123") == Upstream("127.0.0.1", 1123)
    assert parse_upstream("[::1]:99") == Upstream("::1", 99)
    assert parse_upstream("2001:db8::1") == Upstream("2001:db8::1", 123)


@needs_chronyd
def test_upstream_source_polls_a_real_chronyd_and_chronyd_accepts_the_result(tmp_path: Path):
    port = free_udp_port()
    with chronyd_running(tmp_path / "up", f"port {port}\nbindaddress 127.0.0.1\n"
                         "allow 127.0.0.0/8\nlocal stratum 6\ncmdport 0"):
        wait_until_answering(port)
        # Our poller directly: stratum 6 upstream -> we are 7, refid 127.0.0.1.
        poller = UpstreamClock([Upstream("127.0.0.1", port)], samples=2, sample_spacing_s=0.2)
        chosen = poller.poll_once()
        assert chosen is not None
        import time
        state: ClockState = poller.state(time.time_ns())
        assert state.stratum == 7 and state.refid == bytes([127, 0, 0, 1])
        assert abs(state.offset_ns) < 1_000_000
        # The whole chain: chronyd -> guardntp --clock upstream -> chronyd -Q.
        with guardntp_server(tmp_path, "--clock", "upstream", "--upstream",
                             f"127.0.0.1:{port}", "--set", "clock.samples=1") as server:
            best, _ = client.query("127.0.0.1", server.port)
            assert best.stratum == 7
            result = chronyd_query(server.port, conf_dir=tmp_path / "q")
            offset = parse_chronyd_offset(result.stdout + result.stderr)
            assert offset is not None and abs(offset) < 0.001, result.stdout + result.stderr
