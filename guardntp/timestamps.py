"""NTP time formats as integers.

Rule: nothing on the wire is ever a float. A 64-bit NTP timestamp is an ``int``
(32 bits of seconds since 1900 within an era, 32 bits of fraction), a 32-bit
"short" value (root delay, root dispersion) is an ``int`` in units of 2**-16 s.
Floats appear only where a human reads a number (offsets printed in seconds).
"""

from __future__ import annotations

NS_PER_S = 1_000_000_000
#: Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
NTP_UNIX_OFFSET_S = 2_208_988_800
#: Seconds in one NTP era (2**32): era 0 ends on 2036-02-07.
ERA_S = 1 << 32
TS_MASK = (1 << 64) - 1
SHORT_MAX = (1 << 32) - 1


def unix_ns_to_ntp(unix_ns: int) -> int:
    """Unix time in nanoseconds -> 64-bit NTP timestamp (era folded away, as on the wire)."""
    seconds, ns = divmod(unix_ns, NS_PER_S)
    seconds += NTP_UNIX_OFFSET_S
    fraction = (ns << 32) // NS_PER_S
    return ((seconds & 0xFFFF_FFFF) << 32) | fraction


def ntp_to_unix_ns(ntp_ts: int, pivot_unix_ns: int) -> int:
    """64-bit NTP timestamp -> Unix nanoseconds, choosing the era closest to ``pivot_unix_ns``.

    RFC 5905 §6: a timestamp says nothing of its era; the receiver resolves it by
    assuming it lies within 68 years of a time it already knows (here: its own clock).
    """
    seconds = ntp_ts >> 32
    fraction = ntp_ts & 0xFFFF_FFFF
    frac_ns = (fraction * NS_PER_S + (1 << 31)) >> 32
    pivot_ntp_s = pivot_unix_ns // NS_PER_S + NTP_UNIX_OFFSET_S
    era_start = pivot_ntp_s - (pivot_ntp_s % ERA_S)
    candidate = era_start + seconds
    if candidate - pivot_ntp_s > ERA_S // 2:
        candidate -= ERA_S
    elif pivot_ntp_s - candidate > ERA_S // 2:
        candidate += ERA_S
    return (candidate - NTP_UNIX_OFFSET_S) * NS_PER_S + frac_ns


def ntp_diff_ns(later: int, earlier: int) -> int:
    """Signed difference of two NTP timestamps in ns, correct across an era rollover.

    RFC 5905 §6 computes differences in 64-bit two's complement, which is what
    the wrap below does; differences must be under 68 years.
    """
    diff = (later - earlier) & TS_MASK
    if diff >= 1 << 63:
        diff -= 1 << 64
    return (diff * NS_PER_S) >> 32


def ns_to_short(ns: int) -> int:
    """Nanoseconds -> NTP short format (16.16 fixed point seconds), saturating."""
    if ns <= 0:
        return 0
    value = (ns << 16) // NS_PER_S
    return SHORT_MAX if value > SHORT_MAX else value


def short_to_ns(short: int) -> int:
    """NTP short format -> nanoseconds."""
    return (short * NS_PER_S) >> 16
