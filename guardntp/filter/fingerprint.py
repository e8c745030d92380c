"""Traffic fingerprints: a label for what a source's packets look like.

Rule: a label is one of a small fixed set (so metrics stay bounded) and is
computed from what the filter already has: the first byte, the source port,
and the source's own request count and age. The *packet* label picks the rate
policy; the *behaviour* label (fast poller) is reported only, since polling too
fast is exactly what the bucket already punishes.

Signatures come from ``shared/docs/incidents.md``.
"""

from __future__ import annotations

from ..timestamps import NS_PER_S

NETGEAR_PORT = 23457

# Packet labels (each may carry its own policy in the configuration).
NETGEAR = "netgear-sntpv1-23457"   # SNTPv1 from UDP port 23457 (Netgear MR814, 2003)
SNTPV1 = "sntpv1"                  # other NTPv1 / SNTPv1 firmware (D-Link, SMC)
W32TIME = "w32time-mode1"          # Windows w32time / WinXP SNTP: symmetric active, v3
NTPV4 = "ntpv4"                    # ordinary chrony / ntpd / NTPsec / SNTPv4 clients
NTPV3 = "ntpv3"
NTPV2 = "ntpv2"
NTS = "nts"                        # NTPv4 protected by NTS (RFC 8915): cannot be spoofed
# Behaviour label.
FAST_POLLER = "fast-poller"        # averaging under RFC 4330's 15 s minimum poll

PACKET_LABELS = (NETGEAR, SNTPV1, W32TIME, NTPV4, NTPV3, NTPV2, NTS)
ALL_LABELS = PACKET_LABELS + (FAST_POLLER,)

#: RFC 4330 §10: SNTP clients must not poll more often than every 15 s.
MIN_POLL_INTERVAL_NS = 15 * NS_PER_S
#: Judge the polling interval only once a source has shown this many requests.
FAST_POLLER_MIN_REQUESTS = 4

_VERSION_LABEL = {1: SNTPV1, 2: NTPV2, 3: NTPV3, 4: NTPV4}


def packet_label(first_byte: int, source_port: int) -> str:
    """The label of one request, from its first byte and source port."""
    version = (first_byte >> 3) & 7
    if version == 1:
        return NETGEAR if source_port == NETGEAR_PORT else SNTPV1
    if first_byte & 7 == 1:
        return W32TIME
    return _VERSION_LABEL.get(version, NTPV4)


def is_fast_poller(requests: int, first_seen_ns: int, last_seen_ns: int) -> bool:
    """Mean interval under 15 s after enough requests to judge."""
    if requests < FAST_POLLER_MIN_REQUESTS:
        return False
    return (last_seen_ns - first_seen_ns) < MIN_POLL_INTERVAL_NS * (requests - 1)


def mean_interval_ns(requests: int, first_seen_ns: int, last_seen_ns: int) -> int | None:
    if requests < 2:
        return None
    return (last_seen_ns - first_seen_ns) // (requests - 1)
