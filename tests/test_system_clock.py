"""``--clock system``: chronyd's word wins over the kernel's bits (pure, with fakes).

The chronyc lines are what ``chronyc -c -n tracking`` prints (chrony 4.3); the
kernel readings are what ``adjtimex`` returns. Nothing here runs chronyd.
"""

from __future__ import annotations

import logging

import pytest

from guardntp.clock import ClockState
from guardntp.responder import Responder, inspect_request
from guardntp.timesources.kernel import STA_DEL, STA_INS, STA_UNSYNC, KernelClock
from guardntp.timesources.system import (
    KERNEL_REFRESH_NS,
    SystemClock,
    Tracking,
    clock_state_from,
    parse_chronyc_tracking,
)
from guardntp.timestamps import NS_PER_S
from guardntp.verdicts import Reason
from guardntp.wire import Leap, Mode, NtpPacket, encode, parse

NOW = 1_800_000_000 * NS_PER_S
CONFIG_REFID = b"GPS\0"


def tracking_line(leap: str = "Normal", stratum: int = 3, refid: str = "C0000201",
                  root_delay: str = "0.001500000", root_dispersion: str = "0.000250000") -> str:
    return (f"{refid},192.0.2.1,{stratum},1799999990.000000000,0.000001000,0.000000500,"
            f"0.000002000,1.500,0.001,0.010,{root_delay},{root_dispersion},64.0,{leap}")


#: Exactly what chronyd 4.3 printed here before its first sample.
NOT_SYNCHRONISED = ("00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,"
                    "0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised")
KERNEL_SYNCED = KernelClock(state=0, status=0, maxerror_us=1500, esterror_us=20)
KERNEL_INS = KernelClock(state=1, status=STA_INS, maxerror_us=1500, esterror_us=20)
KERNEL_DEL = KernelClock(state=2, status=STA_DEL, maxerror_us=1500, esterror_us=20)
KERNEL_UNSYNCED = KernelClock(state=5, status=STA_UNSYNC, maxerror_us=16_000_000,
                              esterror_us=0)


def state(kernel: KernelClock, line: str | None) -> ClockState:
    tracking = parse_chronyc_tracking(line) if line is not None else None
    return clock_state_from(kernel, tracking, 10, CONFIG_REFID, -20, NOW)


def served(clock: ClockState) -> NtpPacket:
    """The reply a client gets from a responder serving ``clock``."""
    responder = Responder(clock, NOW)
    request = encode(NtpPacket(mode=Mode.CLIENT, transmit_ts=0x1234))
    inspected = inspect_request(request, 40000)
    assert not isinstance(inspected, Reason)
    ts = responder.served_ntp(NOW)
    return parse(responder.time_reply(request, inspected, ts, ts))


@pytest.mark.parametrize("kernel", [KERNEL_SYNCED, KERNEL_DEL])
def test_chronyds_insert_second_is_served_without_the_kernel_bit(kernel):
    # leapsecmode slew/step: chronyd announces the leap but leaves STA_INS clear.
    clock = state(kernel, tracking_line("Insert second"))
    assert clock.synchronized and clock.leap is Leap.INSERT_SECOND
    assert served(clock).leap is Leap.INSERT_SECOND


def test_chronyds_delete_second_is_served_without_the_kernel_bit():
    clock = state(KERNEL_SYNCED, tracking_line("Delete second"))
    assert clock.leap is Leap.DELETE_SECOND and served(clock).leap is Leap.DELETE_SECOND


@pytest.mark.parametrize("kernel", [KERNEL_INS, KERNEL_DEL])
def test_chronyds_normal_wins_over_a_kernel_leap_bit(kernel):
    clock = state(kernel, tracking_line("Normal"))
    assert clock.synchronized and clock.leap is Leap.NONE


def test_without_chronyd_the_kernel_bits_still_decide():
    assert state(KERNEL_INS, None).leap is Leap.INSERT_SECOND
    assert state(KERNEL_DEL, None).leap is Leap.DELETE_SECOND
    assert state(KERNEL_SYNCED, None).leap is Leap.NONE


def test_chronyd_not_synchronised_means_li3_even_if_the_kernel_says_synchronised():
    # Before this, the kernel's bits won: LI=0 at clock.stratum with refid 0.0.0.0.
    clock = state(KERNEL_SYNCED, NOT_SYNCHRONISED)
    assert not clock.synchronized
    assert clock.detail == "chronyd reports Not synchronised"
    reply = served(clock)
    assert reply.leap is Leap.UNSYNCHRONIZED and reply.stratum == 0
    assert reply.refid == b"\0\0\0\0"


def test_chronyd_at_stratum_16_with_normal_leap_is_unsynchronised_too():
    clock = state(KERNEL_SYNCED, tracking_line("Normal", stratum=16))
    assert not clock.synchronized and clock.detail == "chronyd reports stratum 16"


def test_kernel_unsynchronised_means_li3_whatever_chronyd_says():
    clock = state(KERNEL_UNSYNCED, tracking_line("Insert second"))
    assert not clock.synchronized and served(clock).leap is Leap.UNSYNCHRONIZED


def test_served_stratum_is_chronyds_own_not_one_more():
    # guardntp is a second interface of the server chronyd runs: no hop is added,
    # so stratum, refid and root figures are chronyd's (docs/operations.md says so).
    clock = state(KERNEL_SYNCED, tracking_line(stratum=3, refid="C0000201"))
    reply = served(clock)
    assert reply.stratum == 3 and reply.refid == bytes([192, 0, 2, 1])
    assert clock.root_delay_ns == 1_500_000 and clock.root_dispersion_ns == 250_000


def test_chronyds_root_distance_past_3_s_is_served_as_unsynchronised():
    clock = state(KERNEL_SYNCED, tracking_line(root_delay="2.000000000",
                                               root_dispersion="2.500000000"))
    assert not clock.synchronized
    assert clock.detail == ("chronyd's root distance 3.500 s exceeds 3 s (root delay 2.000 s, "
                            "root dispersion 2.500 s)")
    clock = state(KERNEL_SYNCED, tracking_line(root_dispersion="16.000000000"))
    assert clock.detail == "chronyd's root dispersion 16.000 s is not below the 16 s maximum"


def test_kernel_maxerror_past_3_s_without_chronyd_is_unsynchronised():
    kernel = KernelClock(state=0, status=0, maxerror_us=3_500_000, esterror_us=20)
    clock = state(kernel, None)
    assert not clock.synchronized and clock.detail.startswith(
        "kernel maxerror: root distance 3.500 s exceeds 3 s")
    assert state(KernelClock(0, 0, 2_900_000, 20), None).synchronized


def test_parse_keeps_chronyds_leap_status():
    assert parse_chronyc_tracking(tracking_line("Insert second")).leap is Leap.INSERT_SECOND
    assert parse_chronyc_tracking(tracking_line("Delete second")).leap is Leap.DELETE_SECOND
    tracking = parse_chronyc_tracking(NOT_SYNCHRONISED)
    assert tracking.leap is Leap.UNSYNCHRONIZED and not tracking.synchronized
    assert tracking.stratum == 0


def test_system_clock_follows_chronyd_through_sync_loss_and_back(
        caplog: pytest.LogCaptureFixture):
    lines = iter([tracking_line("Insert second"), NOT_SYNCHRONISED, tracking_line("Normal")])
    current: list[Tracking | None] = [None]

    def read_tracking() -> Tracking | None:
        current[0] = parse_chronyc_tracking(next(lines))
        return current[0]

    source = SystemClock(stratum=10, refid=CONFIG_REFID, read_kernel=lambda: KERNEL_SYNCED,
                         read_tracking=read_tracking)
    caplog.set_level(logging.INFO, logger="guardntp.clock")
    step = 16 * NS_PER_S    # chronyc is asked again every 16 s
    first = source.state(NOW)
    assert first.synchronized and first.leap is Leap.INSERT_SECOND and first.stratum == 3
    assert source.state(NOW + KERNEL_REFRESH_NS).leap is Leap.INSERT_SECOND
    lost = source.state(NOW + step)
    assert not lost.synchronized and lost.wire_leap is Leap.UNSYNCHRONIZED
    back = source.state(NOW + 2 * step)
    assert back.synchronized and back.leap is Leap.NONE
    messages = [record.getMessage() for record in caplog.records]
    assert any("NOT synchronised (chronyd reports Not synchronised)" in m for m in messages)
    assert any("synchronised again" in m for m in messages), messages
