"""Access lists: allow and deny by CIDR, IPv4 and IPv6, longest prefix wins.

Rule: a lookup is by packed address bytes; entries live in one dict per
prefix length, so a lookup is at most one dict probe per length in use. The
blocklist (``guardntp/blocklist``) feeds entries with an origin and an expiry
into the same table; an expired entry simply stops matching.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from ..netaddr import BadAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    ALLOW = "allow"      # normal service, subject to rate limits
    EXEMPT = "exempt"    # trusted: never rate limited (monitoring, your own NAT)
    DROP = "drop"        # silent drop
    DENY = "deny"        # DENY Kiss-o'-Death (itself rate limited), then drop


@dataclass(frozen=True, slots=True)
class AclEntry:
    network: Network
    action: Action
    origin: str = "config"          # config, manual, import, auto
    reason: str = ""
    expires_ns: int | None = None   # wall-clock Unix ns; None = never

    def active(self, now_ns: int) -> bool:
        return self.expires_ns is None or now_ns < self.expires_ns


#: ::ffff:0:0/96, where IPv4-mapped IPv6 addresses live (RFC 4291 section 2.5.5.2).
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def as_seen_by_the_filter(network: Network) -> Network:
    """An IPv4-mapped IPv6 network as the IPv4 network it stands for
    (``::ffff:192.0.2.0/120`` -> ``192.0.2.0/24``); any other network unchanged.

    A dual-stack socket reports an IPv4 client as ``::ffff:a.b.c.d``, but the filter
    keys every source on its packed address, where such a client is plain IPv4
    (``netaddr.packed_from_sockaddr``): written as mapped IPv6, an entry would never match.
    """
    if (isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96
            and network.subnet_of(_V4_MAPPED)):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_network(text: str, strict: bool = True) -> Network:
    """A CIDR or a bare address. With ``strict``, host bits past the prefix are an error.
    IPv4-mapped IPv6 comes back as the IPv4 network (:func:`as_seen_by_the_filter`)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=strict)
    except ValueError as error:
        message = str(error)
        if "host bits set" in message:
            network = ipaddress.ip_network(text.strip(), strict=False)
            raise BadAddress(f"{text.strip()!r} has host bits set past the /{network.prefixlen}; "
                             f"did you mean {as_seen_by_the_filter(network)}?") from None
        raise BadAddress(f"{text.strip()!r} is not an IPv4 or IPv6 address or CIDR") from None
    return as_seen_by_the_filter(network)


class AccessList:
    """Longest-prefix-match table. ``generation`` changes on every edit, so callers
    may cache a lookup result per source and re-check only when it moves."""

    __slots__ = ("_tables", "_lengths", "generation")

    def __init__(self, entries: list[AclEntry] | None = None) -> None:
        # _tables[(version, prefixlen)] = {network int: entry}
        self._tables: dict[tuple[int, int], dict[int, AclEntry]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 16: []}
        self.generation = 0
        for entry in entries or []:
            self.add(entry)

    def add(self, entry: AclEntry) -> None:
        network = entry.network
        width = 4 if network.version == 4 else 16
        table = self._tables.setdefault((width, network.prefixlen), {})
        table[int(network.network_address)] = entry
        lengths = self._lengths[width]
        if network.prefixlen not in lengths:
            lengths.append(network.prefixlen)
            lengths.sort(reverse=True)
        self.generation += 1

    def remove(self, network: Network) -> bool:
        width = 4 if network.version == 4 else 16
        table = self._tables.get((width, network.prefixlen))
        if not table or table.pop(int(network.network_address), None) is None:
            return False
        if not table:
            del self._tables[(width, network.prefixlen)]
            self._lengths[width].remove(network.prefixlen)
        self.generation += 1
        return True

    def replace(self, entries: list[AclEntry]) -> None:
        """Swap in a whole new list (reload, blocklist refresh); bumps the generation.
        All or nothing: the new tables are built before any of these is touched."""
        self.adopt(AccessList(entries))

    def adopt(self, other: AccessList) -> None:
        """Take ``other``'s entries in place of these, keeping this object (the compiled
        loop holds it) and bumping the generation so cached lookups are redone.
        Plain assignments only, so it cannot fail halfway; ``other`` is not used again."""
        self._tables = other._tables
        self._lengths = other._lengths
        self.generation += 1

    def covers_ipv6(self) -> bool:
        """Is there any IPv6 entry? (If not, every IPv6 lookup is None: the compiled
        loop then skips the lookup Pipeline.decide makes for each IPv6 packet.)"""
        return bool(self._lengths[16])

    def entries(self) -> list[AclEntry]:
        return [entry for table in self._tables.values() for entry in table.values()]

    def lookup(self, packed: bytes, now_ns: int) -> AclEntry | None:
        """The active entry with the longest prefix covering ``packed``, if any."""
        width = len(packed)
        lengths = self._lengths.get(width)
        if not lengths:
            return None
        address = int.from_bytes(packed, "big")
        bits = width * 8
        for prefixlen in lengths:
            entry = self._tables[(width, prefixlen)].get(
                (address >> (bits - prefixlen)) << (bits - prefixlen))
            if entry is not None and entry.active(now_ns):
                return entry
        return None

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())
