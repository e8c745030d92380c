"""Time sources: the kernel + chronyd view, the upstream poller, the local clock."""

from __future__ import annotations

import json
import logging
import time
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
from guardntp.cli import main
from guardntp.clock import ClockState, unsynchronized
from guardntp.control.reports import format_stats, stats_report
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.responder import Responder
from guardntp.timesources import refid_bytes, sync_change
from guardntp.timesources.kernel import STA_INS, STA_UNSYNC, KernelClock, read_kernel_clock
from guardntp.timesources.system import (
    KERNEL_REFRESH_NS,
    SystemClock,
    clock_state_from,
    parse_chronyc_tracking,
)
from guardntp.timesources.upstream import Measurement, Upstream, UpstreamClock, parse_upstream
from guardntp.timesources.upstream import clock_state_from as upstream_state
from guardntp.timestamps import NS_PER_S, unix_ns_to_ntp
from guardntp.wire import Leap, NtpPacket

NOW = 1_800_000_000 * NS_PER_S
REAL_TRACKING = ("7F7F0101,,8,1795294628.107179862,0.000000000,0.000000000,0.000000000,0.000,"
                 "0.000,0.000,0.001500000,0.000250000,0.0,Normal")
SYNCED = KernelClock(state=0, status=0, maxerror_us=1500, esterror_us=20)
UNSYNCED = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=16_000_000, esterror_us=0)


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
            time.sleep(0.1)
        assert source._tracking is not None and source._tracking.stratum == 7
        state = clock_state_from(SYNCED, source._tracking, 2, b"\0" * 4, -20, NOW)
        assert state.stratum == 7


def test_system_clock_served_on_this_machine_matches_the_kernel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Here the kernel says "unsynchronised" (no NTP daemon disciplines it), so replies
    must be LI=3 — and our client must refuse to take time from them. The server
    says so once in its log, and ``guardntp stats`` shows the clock it serves."""
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
                time.sleep(0.1)
        else:
            pytest.fail("server never answered")
        # Several clock refreshes (every 0.25 s) pass: still one warning at most.
        time.sleep(1.0)
        capsys.readouterr()
        assert main(["stats", "--json", "--state-dir", str(server.state_dir)]) == 0
        clock = json.loads(capsys.readouterr().out)["clock"]
        assert main(["stats", "--state-dir", str(server.state_dir)]) == 0
        text = capsys.readouterr().out
        log = server.log()
    assert clock["source"] == "system" and clock["synchronized"] is synced
    assert log.count("system clock NOT synchronised") == (0 if synced else 1), log
    if not synced:
        assert clock["leap"] == "unsynchronized" and clock["stratum"] == 0
        assert "kernel reports the clock unsynchronised" in log
        assert text.startswith("clock        system, NOT synchronised (")


def _counting(readings: list[KernelClock | OSError]):
    """A fake adjtimex: the readings in turn (the last one repeats), and a call count."""
    calls = []

    def read() -> KernelClock:
        calls.append(1)
        reading = readings[min(len(calls), len(readings)) - 1]
        if isinstance(reading, OSError):
            raise reading
        return reading
    return read, calls


def test_sync_change_logs_only_changes_and_no_first_synchronised_reading():
    synced = clock_state_from(SYNCED, None, 2, b"GPS\0", -20, NOW)
    lost = clock_state_from(UNSYNCED, None, 2, b"GPS\0", -20, NOW)
    assert sync_change(None, synced) is None
    assert sync_change(True, synced) is None and sync_change(False, lost) is None
    level, message = sync_change(None, lost) or (0, "")
    assert level == logging.WARNING
    assert message.startswith("system clock NOT synchronised (kernel reports the clock "
                              "unsynchronised)") and "leap indicator 3" in message
    assert sync_change(True, lost) == (level, message)
    level, message = sync_change(False, synced) or (0, "")
    assert level == logging.INFO and "synchronised again" in message
    assert "stratum 2" in message and "refid 71.80.83.0" in message
    assert "leap none" in message


def test_system_clock_warns_once_when_the_kernel_loses_sync_and_tells_when_it_is_back(
        caplog: pytest.LogCaptureFixture):
    read, calls = _counting([SYNCED, SYNCED, UNSYNCED, UNSYNCED, OSError(1, "nope"),
                             UNSYNCED, SYNCED, SYNCED])
    source = SystemClock(stratum=3, read_kernel=read, read_tracking=lambda: None)
    caplog.set_level(logging.DEBUG, logger="guardntp.clock")
    served = []
    for step in range(10):
        now = NOW + step * KERNEL_REFRESH_NS
        served.append(source.state(now).synchronized)
        # Within the refresh interval the cached reading is served: no adjtimex call.
        assert source.state(now + KERNEL_REFRESH_NS - 1).synchronized is served[-1]
    assert len(calls) == 10
    assert served == [True, True, False, False, False, False, True, True, True, True]
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO], records
    assert "NOT synchronised (kernel reports the clock unsynchronised)" in records[0][1]
    assert "synchronised again" in records[1][1] and "stratum 3" in records[1][1]


def test_system_clock_unsynchronised_from_the_start_warns_at_the_first_reading(
        caplog: pytest.LogCaptureFixture):
    read, _ = _counting([OSError(38, "Function not implemented")])
    source = SystemClock(read_kernel=read, read_tracking=lambda: None)
    caplog.set_level(logging.INFO, logger="guardntp.clock")
    for step in range(5):
        assert not source.state(NOW + step * KERNEL_REFRESH_NS).synchronized
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "NOT synchronised (adjtimex: " in caplog.records[0].getMessage()


def test_system_clock_with_fake_chronyc_reports_chronyds_stratum_when_back(
        caplog: pytest.LogCaptureFixture):
    read, _ = _counting([UNSYNCED, SYNCED])
    tracking = parse_chronyc_tracking(REAL_TRACKING)
    source = SystemClock(read_kernel=read, read_tracking=lambda: tracking)
    caplog.set_level(logging.INFO, logger="guardntp.clock")
    source.state(NOW)
    state = source.state(NOW + KERNEL_REFRESH_NS)
    assert state.synchronized and state.stratum == 8
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "disciplined by chronyd" in messages[1]
    assert "stratum 8, refid 127.127.1.1, leap none" in messages[1]


def test_stats_report_has_the_served_clock():
    state = clock_state_from(SYNCED, parse_chronyc_tracking(REAL_TRACKING), 2, b"\0" * 4,
                             -20, NOW)
    report = stats_report(Pipeline(FilterPolicy(), Responder(state, NOW)))
    clock = report["clock"]
    assert clock["source"] == "system" and clock["synchronized"] is True
    assert clock["detail"] == "kernel clock disciplined by chronyd"
    assert (clock["leap"], clock["stratum"], clock["refid"]) == ("none", 8, "127.127.1.1")
    assert clock["precision"] == -20 and clock["offset_s"] == 0
    assert clock["root_delay_s"] == pytest.approx(0.0015, abs=2e-5)
    # Root dispersion as served at NOW: 0.25 ms grown by 15 ppm of the reference's age.
    age_s = (NOW - tracking_reference_ns()) / NS_PER_S
    assert clock["root_dispersion_s"] == pytest.approx(min(16.0, 0.00025 + age_s * 15e-6),
                                                       abs=2e-5)
    json.dumps(report)   # sent as JSON over the control socket
    text = format_stats(report)
    assert text.splitlines()[:2] == [
        "clock        system, synchronised (kernel clock disciplined by chronyd)",
        "  serving    leap none, stratum 8, refid 127.127.1.1, root delay 0.001495 s, "
        f"root dispersion {clock['root_dispersion_s']:.6f} s"]


def tracking_reference_ns() -> int:
    return parse_chronyc_tracking(REAL_TRACKING).reference_unix_ns


def test_stats_report_for_an_unsynchronised_clock_says_what_replies_carry():
    state = unsynchronized("system", "kernel reports the clock unsynchronised")
    clock = stats_report(Pipeline(FilterPolicy(), Responder(state, NOW)))["clock"]
    assert clock["synchronized"] is False
    assert (clock["leap"], clock["stratum"], clock["refid"]) == ("unsynchronized", 0, "")
    assert clock["root_dispersion_s"] == 16.0
    lines = format_stats({**stats_report(Pipeline(FilterPolicy(), Responder(state, NOW))),
                          "clock": clock}).splitlines()
    assert lines[0] == ("clock        system, NOT synchronised (kernel reports the clock "
                        "unsynchronised)")
    assert lines[1].startswith("  serving    leap unsynchronized, stratum 0, refid -,")


def test_format_stats_without_a_clock_section_from_an_older_server():
    state = unsynchronized("system", "x")
    report = stats_report(Pipeline(FilterPolicy(), Responder(state, NOW)))
    del report["clock"]
    assert format_stats(report).startswith("packets ")


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
