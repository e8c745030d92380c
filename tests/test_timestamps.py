from hypothesis import given
from hypothesis import strategies as st

from guardntp.timestamps import (
    NS_PER_S,
    NTP_UNIX_OFFSET_S,
    ns_to_short,
    ntp_diff_ns,
    ntp_to_unix_ns,
    short_to_ns,
    unix_ns_to_ntp,
)

# 1900..2200 in Unix ns: crosses the 2036 era rollover.
unix_times = st.integers(min_value=-NTP_UNIX_OFFSET_S * NS_PER_S + 1,
                         max_value=7_258_118_400 * NS_PER_S)


def test_unix_epoch_is_ntp_2208988800():
    assert unix_ns_to_ntp(0) == NTP_UNIX_OFFSET_S << 32


def test_half_second_fraction_is_exact():
    assert unix_ns_to_ntp(NS_PER_S // 2) & 0xFFFF_FFFF == 1 << 31


def test_era_rollover_2036_wraps_to_zero_seconds():
    rollover_unix_s = (1 << 32) - NTP_UNIX_OFFSET_S  # 2036-02-07T06:28:16Z
    assert unix_ns_to_ntp(rollover_unix_s * NS_PER_S) == 0
    # ... and a pivot after the rollover reads it back in era 1.
    assert ntp_to_unix_ns(0, rollover_unix_s * NS_PER_S + 10) == rollover_unix_s * NS_PER_S


@given(unix_times)
def test_round_trip_within_one_ns(unix_ns):
    back = ntp_to_unix_ns(unix_ns_to_ntp(unix_ns), pivot_unix_ns=unix_ns + 3600 * NS_PER_S)
    assert abs(back - unix_ns) <= 1


@given(unix_times, st.integers(min_value=-10**12, max_value=10**12))
def test_difference_survives_era_wrap(unix_ns, delta_ns):
    later = unix_ns_to_ntp(unix_ns + delta_ns)
    earlier = unix_ns_to_ntp(unix_ns)
    assert abs(ntp_diff_ns(later, earlier) - delta_ns) <= 2


def test_short_format():
    assert ns_to_short(NS_PER_S) == 1 << 16
    assert ns_to_short(-5) == 0
    assert ns_to_short(10**15) == 0xFFFF_FFFF  # saturates
    assert short_to_ns(1 << 16) == NS_PER_S
