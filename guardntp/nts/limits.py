"""Admission control for NTS-KE connections (pure; time is an argument).

A TLS handshake costs the server about a thousand times what an NTP reply does, so
every new connection passes, in order: the cap on concurrent connections, a
per-source and a per-prefix (/24, /56) token bucket, and the global handshake
budget. A TCP connection cannot be spoofed, so a source that is refused has
earned it; the tables are still bounded (least recently seen evicted first).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeLimits:
    """Every NTS-KE limit (defaults sized for a public server on a small machine)."""

    #: connections per second a source may open in the long run, and its burst.
    source_rate: float = 0.1
    source_burst: int = 8
    #: the same for a /24 (IPv4) or /56 (IPv6) prefix.
    prefix_rate: float = 2.0
    prefix_burst: int = 64
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    #: handshakes per second for the whole server, and the burst.
    handshake_rate: float = 200.0
    handshake_burst: int = 400
    #: connections open at once.
    max_connections: int = 256
    #: a connection must finish (handshake, request, response) within this...
    session_timeout_s: float = 5.0
    #: ...and may not sit silent longer than this.
    idle_timeout_s: float = 2.0
    #: largest record body, and largest request, accepted (RFC 8915 has no larger need).
    max_record_body: int = 1024
    max_request: int = 4096
    #: sources (and prefixes) tracked.
    max_tracked: int = 65_536

    def __post_init__(self) -> None:
        for name in ("source_rate", "prefix_rate", "handshake_rate", "session_timeout_s",
                     "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"nts limit {name} must be positive")
        for name in ("source_burst", "prefix_burst", "handshake_burst", "max_connections",
                     "max_record_body", "max_request", "max_tracked"):
            if getattr(self, name) < 1:
                raise ValueError(f"nts limit {name} must be at least 1")


class Bucket:
    __slots__ = ("tokens", "last")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.last = now

    def take(self, rate: float, burst: int, now: float) -> bool:
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.last) * rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Table:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, rate: float, burst: int, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(burst, now)
            while len(self.buckets) > self.limit:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        return bucket.take(rate, burst, now)


def prefix_of(address: str, limits: KeLimits) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = limits.ipv4_prefix if ip.version == 4 else limits.ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class Admission:
    """Decides whether a new connection may start; the answer is a counter name."""

    def __init__(self, limits: KeLimits, now: float) -> None:
        self.limits = limits
        self.sources = _Table(limits.max_tracked)
        self.prefixes = _Table(limits.max_tracked)
        self.handshakes = Bucket(limits.handshake_burst, now)

    def reconfigure(self, limits: KeLimits) -> None:
        """Apply ``limits`` from now on, keeping every bucket's level."""
        self.limits = limits
        self.sources.limit = self.prefixes.limit = limits.max_tracked

    def admit(self, address: str, open_connections: int, now: float) -> str:
        """``ke_accepted`` or the ``ke_refused_*`` reason. A refused connection still
        costs the source (a flood does not refill itself by being refused)."""
        lim = self.limits
        if open_connections >= lim.max_connections:
            return "ke_refused_concurrency"
        if not self.sources.take(address, lim.source_rate, lim.source_burst, now):
            return "ke_refused_source_rate"
        if not self.prefixes.take(prefix_of(address, lim), lim.prefix_rate, lim.prefix_burst,
                                  now):
            return "ke_refused_prefix_rate"
        if not self.handshakes.take(lim.handshake_rate, lim.handshake_burst, now):
            return "ke_refused_handshake_budget"
        return "ke_accepted"
