"""How many clients stand behind one source address, and which of its packets are whose.

Rule: pure constants and arithmetic; the per-source cells live in the pipeline's
records (``pipeline.py``) and the compiled loop reads the tables built here.

**The crowd estimate.** A NAT maps every client (and chrony's every request) to its
own source port, and independent pollers add up to irregular arrivals, while one
host flooding sends from one port, or at a steady beat. Per source the filter keeps:

* a 63-bit sketch of the source ports seen in the current 64 s window (bit
  ``port % 63``), read by linear counting: with ``z`` of the ``m = 63`` bits still
  clear, about ``m ln(m / z)`` distinct ports were seen (:func:`crowd_table`);
* the mean gap between requests and the mean absolute deviation from it, as
  integer moving averages (1/16 per request; the first gap sets the mean, and a
  deviation of half of it).

The source's bucket refills ``crowd`` times faster (its interval is divided by the
crowd; its burst, a time tolerance, holds ``crowd`` times more requests; when the
crowd grows, what the bucket has used is repriced at the new crowd) where

    crowd = max(last window's estimate, this window's so far, scaled to a whole
                window (:func:`extrapolated`))                  if irregular
            1                                                    otherwise

capped at ``max_crowd``,
and *irregular* means deviation / mean >= 0.35: Poisson arrivals (a crowd) give
0.74, a periodic sender ~0 (chronyd at ``minpoll -2`` with random ports is one
host: 0.25 s apart, deviation 1 %).

**Bounds against imitation.** A flooder who sends from random ports at random times
looks like a crowd, and gains at most ``max_crowd`` times one client's allowance
(256 x 1/8 s = 32/s at the defaults), inside its prefix's bucket (16/s per /24 by
default), and only while its address shows one traffic class (below).

**Traffic classes by TTL.** A spoofer elsewhere on the internet reaches us with a
different IP TTL / hop limit than the real owner of the address. The first request
fixes a source's *home* TTL; a request whose TTL is more than :data:`TTL_SLACK`
from it is in the *other* class and is charged to a second bucket. A flood in a
victim's name therefore drains its own bucket and not the victim's. While both
classes are active (each seen within :data:`CLASS_MEMORY_NS`) and look like the
same kind of sender at two distances (the same initial TTL, :func:`same_initial_ttl`)
the address is *contested*: it gets no crowd allowance and no RATE KoD (a KoD would
reach the victim), and automatic blocking leaves it alone. A spoofer who matches the
victim's TTL class shares its bucket: that residual risk is documented in
docs/filter.md.
"""

from __future__ import annotations

import math

from ..timestamps import NS_PER_S

#: The sketch is one non-negative 64-bit integer: 63 bits.
PORT_SKETCH_BITS = 63
#: Ports are counted per window of this length; the last window's estimate is kept.
CROWD_WINDOW_NS = 64 * NS_PER_S
#: Moving averages of the gap move 1/2^EWMA_SHIFT of the way per request.
EWMA_SHIFT = 4
#: Irregular when deviation / mean >= IRREGULAR_NUM / IRREGULAR_DEN (0.35).
IRREGULAR_NUM = 7
IRREGULAR_DEN = 20
#: TTLs within this many hops of the home TTL are the home class (route changes of
#: a hop or three do not split a client in two).
TTL_SLACK = 3
#: A class counts as active for this long after it was last charged: longer than
#: chrony's and ntpd's longest default poll (1024 s), so a victim polling at its
#: maxpoll keeps the address "mixed" while a spoofer floods in its name.
CLASS_MEMORY_NS = 2048 * NS_PER_S
#: The initial TTLs senders use (Linux, macOS, Android, iOS: 64; Windows: 128; many
#: embedded stacks and Solaris: 255). A TTL seen is the next of these at or above it,
#: less the hops travelled.
INITIAL_TTLS = (64, 128, 255)
#: The default cap on the crowd estimate.
DEFAULT_MAX_CROWD = 256


def port_bit(port: int) -> int:
    """The sketch bit of a source port."""
    return 1 << (port % PORT_SKETCH_BITS)


def crowd_table(max_crowd: int) -> tuple[int, ...]:
    """Crowd estimate per number of sketch bits set (0-63), capped at ``max_crowd``.

    Linear counting: with ``z`` bits clear, ``m ln(m / z)`` distinct values; all
    bits set (``z = 0``) means at least as many as the sketch can tell, the cap."""
    m = PORT_SKETCH_BITS
    table = []
    for bits_set in range(m + 1):
        clear = m - bits_set
        estimate = max_crowd if clear == 0 else round(m * math.log(m / clear))
        table.append(max(1, min(max_crowd, estimate)))
    return tuple(table)


def extrapolated(estimate: int, elapsed_ns: int) -> int:
    """This window's estimate so far, scaled to a whole window: the ports beyond the
    first, seen in ``elapsed_ns``, as if the window had run its length (counting at
    least an eighth of it as elapsed, so a second port a moment after the first
    counts as 8, not 10^9). A single port stays 1, however early."""
    return 1 + (estimate - 1) * CROWD_WINDOW_NS // max(elapsed_ns, CROWD_WINDOW_NS >> 3)


def initial_ttl(ttl: int) -> int:
    """The initial TTL a request seen with ``ttl`` most likely started with."""
    for initial in INITIAL_TTLS:
        if ttl <= initial:
            return initial
    return INITIAL_TTLS[-1]


def same_initial_ttl(home_ttl: int, other_ttl: int) -> bool:
    """Two TTL classes from the same kind of sender at different distances: what a
    spoofer elsewhere looks like. Different initial TTLs (Windows and Linux hosts
    behind one NAT) are two kinds of client on one path, not a sign of spoofing."""
    return home_ttl >= 0 and other_ttl >= 0 and initial_ttl(home_ttl) == initial_ttl(other_ttl)


def is_irregular(gap_mean_ns: int, gap_dev_ns: int) -> bool:
    """Do the gaps look like many independent pollers rather than one steady sender?"""
    return gap_mean_ns > 0 and gap_dev_ns * IRREGULAR_DEN >= gap_mean_ns * IRREGULAR_NUM
