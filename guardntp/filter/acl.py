"""Access lists: allow and deny by CIDR, IPv4 and IPv6, longest prefix wins.

Rule: a lookup is by packed address bytes; entries live in one table per
prefix length, keyed by the prefix's bytes (the network address cut after its
last whole or partial byte, host bits zero), so a lookup is at most one probe
per length in use. Where the extension is built each table is an
``AddressTable`` and the lookup is compiled (``_fastlane.longest_match``, which
the packet loop calls directly); :func:`longest_match` is its reference model
and the lookup without a compiler. Two
layers share those dicts: the configuration's ``[[acl]]`` entries and the
blocklist's (``guardntp/blocklist``, entries with an origin and an expiry). On
one prefix the blocklist entry wins while it is active; an expired entry
uncovers what lies beneath it (the configuration's entry on the same prefix,
else a shorter prefix). The blocklist changes by difference: a ``block add``
among 100 000 entries writes one key, not a new table.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

from ..netaddr import BadAddress

try:
    from .._fastlane import AddressTable
    from .._fastlane import longest_match as _compiled_longest_match
except ImportError:  # no C compiler at install: dicts, and the lookup below
    AddressTable = None  # type: ignore[assignment, misc]
    _compiled_longest_match = None  # type: ignore[assignment]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    ALLOW = "allow"      # normal service, subject to rate limits
    EXEMPT = "exempt"    # trusted: never rate limited (monitoring, your own NAT)
    DROP = "drop"        # silent drop
    DENY = "deny"        # DENY Kiss-o'-Death (itself rate limited), then drop


@dataclass(frozen=True, slots=True, init=False, repr=False)
class AclEntry:
    """One entry of either layer: ``AclEntry(network, action, origin, reason,
    expires_ns)``.

    The network is kept as its packed address and prefix length, and made again on
    demand (:attr:`network`): an ``ipaddress`` network costs ~480 bytes, so a
    blocklist of a million entries held that way would be half a gigabyte of them.
    """

    packed: bytes                   # the network address, 4 or 16 bytes
    prefixlen: int
    action: Action
    origin: str                     # config, manual, import, auto
    reason: str
    expires_ns: int | None          # wall-clock Unix ns; None = never

    def __init__(self, network: Network | None = None, action: Action | None = None,
                 origin: str = "config", reason: str = "", expires_ns: int | None = None,
                 *, packed: bytes | None = None, prefixlen: int | None = None) -> None:
        """From a network; or (``dataclasses.replace``) from ``packed`` and ``prefixlen``.
        Raises TypeError for anything that is not an IPv4 or IPv6 network."""
        if network is not None:
            if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise TypeError(f"not an IPv4 or IPv6 network: {network!r}")
            packed, prefixlen = network.network_address.packed, network.prefixlen
        elif (packed.__class__ is not bytes or len(packed) not in (4, 16)
              or prefixlen.__class__ is not int or not 0 <= prefixlen <= 8 * len(packed)):
            raise TypeError(f"not a network: {packed!r}/{prefixlen!r}")
        set_field = object.__setattr__
        set_field(self, "packed", packed)
        set_field(self, "prefixlen", prefixlen)
        set_field(self, "action", action)
        set_field(self, "origin", origin)
        set_field(self, "reason", reason)
        set_field(self, "expires_ns", expires_ns)

    @property
    def network(self) -> Network:
        return (ipaddress.IPv4Network if len(self.packed) == 4
                else ipaddress.IPv6Network)((self.packed, self.prefixlen))

    def active(self, now_ns: int) -> bool:
        return self.expires_ns is None or now_ns < self.expires_ns

    def __repr__(self) -> str:
        return (f"AclEntry({self.network}, {self.action}, {self.origin!r}, {self.reason!r}, "
                f"{self.expires_ns!r})")


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


#: (address width in bytes, prefix length) of each table, by a small code: IPv4 /0-/32
#: are codes 0-32, IPv6 /0-/128 codes 33-161.
_WHERE = [(4, prefixlen) for prefixlen in range(33)] + [(16, prefixlen)
                                                        for prefixlen in range(129)]
#: Where an entry lives in an :class:`AccessList`: its network's address shifted past
#: the host bits (its key in the table), shifted 8 bits left over its table's code.
#: One int, not a tuple: a plan for 100 000 entries makes no garbage to collect.
Key = int
#: What one key holds: the entry of one layer, or (blocklist entry, config entry).
Slot = AclEntry | tuple[AclEntry, AclEntry]
#: One prefix length's entries, by the prefix's bytes (:func:`_prefix_bytes`).
PrefixTable = MutableMapping[bytes, Slot]
#: Per address width, the tables in use, longest prefix first: (prefix length, table).
Probes = tuple[tuple[int, PrefixTable], ...]


def _new_table() -> PrefixTable:
    return {} if AddressTable is None else AddressTable()


def _prefix_bytes(prefix: int, prefixlen: int) -> bytes:
    """A table's key: the ``prefixlen`` bits of ``prefix`` (a network address shifted
    past its host bits), written in the bytes they cover, the rest of the last byte
    zero; a /0 is one zero byte."""
    size = max(1, (prefixlen + 7) // 8)
    return (prefix << (8 * size - prefixlen)).to_bytes(size, "big")


def _prefix_of(key: bytes, prefixlen: int) -> int:
    return int.from_bytes(key, "big") >> (8 * len(key) - prefixlen)


def longest_match(probes: Probes, packed: bytes, now_ns: int) -> AclEntry | None:
    """The active entry with the longest prefix covering ``packed`` among ``probes``
    (its width's tables, longest first). On one prefix the blocklist's entry while
    it is active, then the configuration's; an expired entry uncovers what lies
    beneath it. The reference model of ``_fastlane.longest_match``."""
    for prefixlen, table in probes:
        size = max(1, (prefixlen + 7) // 8)
        spare = 8 * size - prefixlen
        key = packed[:size]
        if spare:
            key = key[:-1] + bytes((key[-1] >> spare << spare,))
        entry = table.get(key)
        if entry is not None:
            if isinstance(entry, tuple):
                block, entry = entry
                expires_ns = block.expires_ns
                if expires_ns is None or now_ns < expires_ns:
                    return block
            expires_ns = entry.expires_ns
            if expires_ns is None or now_ns < expires_ns:
                return entry
    return None


def _packed_key(packed: bytes, prefixlen: int) -> Key:
    """The key of the network at ``packed`` (4 or 16 bytes) / ``prefixlen``."""
    if len(packed) == 4:
        return int.from_bytes(packed, "big") >> (32 - prefixlen) << 8 | prefixlen
    return int.from_bytes(packed, "big") >> (128 - prefixlen) << 8 | (33 + prefixlen)


def _key(network: Network) -> Key:
    """Raises TypeError for anything that is not an IPv4 or IPv6 network."""
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise TypeError(f"not an IPv4 or IPv6 network: {network!r}")
    return _packed_key(network.network_address.packed, network.prefixlen)


def _entry_key(entry: AclEntry) -> Key:
    """:func:`_key` of the entry's network, without making the network."""
    return _packed_key(entry.packed, entry.prefixlen)


def _removal_key(network: Network | AclEntry) -> Key:
    """The key of a network to remove, given as the network or as its entry."""
    return _entry_key(network) if isinstance(network, AclEntry) else _key(network)


def _checked(entry: AclEntry) -> Key:
    """The key of ``entry``, after checking it is one (a lookup must not fail later)."""
    expires_ns = getattr(entry, "expires_ns", None)
    if (not isinstance(entry, AclEntry) or not isinstance(entry.action, Action)
            or (expires_ns is not None and expires_ns.__class__ is not int)):
        raise TypeError(f"not an access-list entry (an action, expires_ns an int or "
                        f"None): {entry!r}")
    return _entry_key(entry)


class AclChange:
    """A change to an :class:`AccessList`, worked out and checked by
    :meth:`AccessList.plan` without touching the list, applied by
    :meth:`AccessList.apply` with operations that cannot fail."""

    __slots__ = ("generation", "writes", "new_tables", "config", "blocked")

    def __init__(self, generation: int, writes: list[tuple[PrefixTable, bytes, Slot | None]],
                 new_tables: dict[tuple[int, int], PrefixTable],
                 config: dict[Key, AclEntry] | None, blocked: int) -> None:
        #: The list's generation the change was worked out against.
        self.generation = generation
        #: Into tables the list has already: (table, key, new slot or None to delete).
        self.writes = writes
        #: Tables for prefix lengths not in use yet, filled already.
        self.new_tables = new_tables
        self.config = config       # the new configuration layer, or None: unchanged
        self.blocked = blocked     # blocklist entries after the change

    def __bool__(self) -> bool:
        """Does it change any lookup?"""
        return bool(self.writes or self.new_tables)


class AccessList:
    """Longest-prefix-match table over two layers: the configuration's ``[[acl]]``
    entries and the live blocklist's. ``generation`` changes on every edit, so callers
    may cache a lookup result per source and re-check only when it moves (or when
    the cached entry expires: the result can change then and only then).

    One table per (address width, prefix length) in use, keyed by the prefix's
    bytes (:func:`_prefix_bytes`). A key held by one layer maps to its entry;
    a key held by both maps to the tuple (blocklist entry, configuration entry),
    so a lookup still probes one table per length. Which layer a lone entry belongs
    to is told by the configuration layer's own small dict (``_config``).
    """

    __slots__ = ("_tables", "_lengths", "_probes", "_config", "_blocked", "generation")

    def __init__(self, entries: Iterable[AclEntry] | None = None,
                 blocklist: Iterable[AclEntry] | None = None) -> None:
        """``entries``: the configuration layer; ``blocklist``: the blocklist layer."""
        self._tables: dict[tuple[int, int], PrefixTable] = {}
        self._config: dict[Key, AclEntry] = {}
        self._blocked = 0
        self._lengths: dict[int, list[int]] = {4: [], 16: []}
        #: Per address width: (prefix length, table), longest prefix first.
        self._probes: dict[int, Probes] = {4: (), 16: ()}
        self.generation = 0
        if entries is not None or blocklist is not None:
            self.apply(self.plan(config=entries, added=blocklist or ()))

    # ------------------------------------------------------------------ changes

    def plan(self, config: Iterable[AclEntry] | None = None, added: Iterable[AclEntry] = (),
             removed: Iterable[Network | AclEntry] = ()) -> AclChange:
        """Work out a change without making it: with ``config``, that list becomes the
        configuration layer; the blocklist layer loses the entries on ``removed``
        networks (given as networks, or as the entries on them), then gains ``added``
        (each replacing the blocklist entry on its network, if any). Only the keys
        these name are visited. Raises TypeError for anything that is not an entry
        (or a network), with nothing changed."""
        config_layer = None if config is None else {_checked(entry): entry for entry in config}
        block: dict[Key, AclEntry | None] = {_removal_key(network): None for network in removed}
        for entry in added:
            block[_checked(entry)] = entry
        return self._plan(config_layer, block)

    def _plan(self, config: dict[Key, AclEntry] | None,
              block: dict[Key, AclEntry | None]) -> AclChange:
        """``config``: the new configuration layer (None: as it is); ``block``: per key,
        the blocklist entry to hold there (None: none)."""
        tables = self._tables
        layer = self._config
        keys: Iterable[Key] = (block if config is None
                               else block.keys() | config.keys() | layer.keys())
        writes: list[tuple[PrefixTable, bytes, Slot | None]] = []
        new_tables: dict[tuple[int, int], PrefixTable] = {}
        blocked = self._blocked
        where_of = _WHERE
        for key in keys:
            where = where_of[key & 0xFF]
            prefix = _prefix_bytes(key >> 8, where[1])
            table = tables.get(where)
            value = None if table is None else table.get(prefix)
            old_block: AclEntry | None
            old_conf: AclEntry | None
            if value is None:
                old_block = old_conf = None
            elif isinstance(value, tuple):
                old_block, old_conf = value
            elif layer.get(key) is value:
                old_block, old_conf = None, value
            else:
                old_block, old_conf = value, None
            new_block = block.get(key, old_block)
            new_conf = old_conf if config is None else config.get(key)
            if new_block is old_block and new_conf is old_conf:
                continue
            blocked += (new_block is not None) - (old_block is not None)
            new: Slot | None = (new_conf if new_block is None else new_block if new_conf is None
                                else (new_block, new_conf))
            if table is not None:
                writes.append((table, prefix, new))
            elif new is not None:
                new_table = new_tables.get(where)
                if new_table is None:
                    new_table = new_tables[where] = _new_table()
                new_table[prefix] = new
        return AclChange(self.generation, writes, new_tables, config, blocked)

    def apply(self, change: AclChange) -> None:
        """Make a change :meth:`plan` worked out, bumping the generation once (if any
        lookup may change). Plain stores and deletions of keys known to be there
        (the tables have room to grow: stores cannot fail but for memory): it cannot
        fail halfway. A change planned against another generation
        is refused (RuntimeError) before anything is touched."""
        if change.generation != self.generation:
            raise RuntimeError("access-list change planned against another generation")
        if change.config is not None:
            self._config = change.config
        if not change:
            return
        tables = self._tables
        emptied = False
        for table, prefix, value in change.writes:
            if value is None:
                del table[prefix]
                emptied = emptied or not table
            else:
                table[prefix] = value
        if emptied:
            for where in [where for where, table in tables.items() if not table]:
                del tables[where]
        tables.update(change.new_tables)
        if emptied or change.new_tables:
            self._index()
        self._blocked = change.blocked
        self.generation += 1

    def _index(self) -> None:
        lengths: dict[int, list[int]] = {4: [], 16: []}
        for width, prefixlen in self._tables:
            lengths[width].append(prefixlen)
        for prefixlens in lengths.values():
            prefixlens.sort(reverse=True)
        tables = self._tables
        self._probes = {width: tuple((prefixlen, tables[(width, prefixlen)])
                                     for prefixlen in prefixlens)
                        for width, prefixlens in lengths.items()}
        self._lengths = lengths

    def set_config(self, entries: Iterable[AclEntry]) -> None:
        """Make ``entries`` the configuration layer; the blocklist layer stays."""
        self.apply(self.plan(config=entries))

    def update_blocklist(self, added: Iterable[AclEntry] = (),
                         removed: Iterable[Network | AclEntry] = ()) -> None:
        """Remove the blocklist entries on ``removed``, then add ``added``: only these
        keys are touched, and the generation moves once."""
        self.apply(self.plan(added=added, removed=removed))

    def blocklist_plan(self, entries: Iterable[AclEntry]) -> AclChange:
        """The change that makes ``entries`` the whole blocklist layer: only entries
        that differ from the present ones (on their network) are written."""
        current = self._blocklist_layer()
        wanted = {_checked(entry): entry for entry in entries}
        block: dict[Key, AclEntry | None] = {key: None for key in current if key not in wanted}
        for key, entry in wanted.items():
            present = current.get(key)
            if present is not entry and present != entry:
                block[key] = entry
        return self._plan(None, block)

    def set_blocklist(self, entries: Iterable[AclEntry]) -> None:
        self.apply(self.blocklist_plan(entries))

    def add(self, entry: AclEntry, blocklist: bool = False) -> None:
        """One entry into the configuration layer (or, with ``blocklist``, that layer)."""
        if blocklist:
            self.update_blocklist(added=(entry,))
        else:
            self.apply(self._plan({**self._config, _checked(entry): entry}, {}))

    def remove(self, network: Network, blocklist: bool = False) -> bool:
        """Take the entry on ``network`` out of one layer; was there one?"""
        key = _key(network)
        if blocklist:
            change = self._plan(None, {key: None})
        elif key in self._config:
            change = self._plan({k: e for k, e in self._config.items() if k != key}, {})
        else:
            return False
        if not change:
            return False
        self.apply(change)
        return True

    def replace(self, entries: Iterable[AclEntry],
                blocklist: Iterable[AclEntry] | None = None) -> None:
        """Swap in whole new layers (``entries`` the configuration's, ``blocklist``
        the blocklist's, none if not given); bumps the generation.
        All or nothing: the new tables are built before any of these is touched."""
        self.adopt(AccessList(entries, blocklist))

    def adopt(self, other: AccessList) -> None:
        """Take ``other``'s entries in place of these, keeping this object (the compiled
        loop holds it) and bumping the generation so cached lookups are redone.
        Plain assignments only, so it cannot fail halfway; ``other`` is not used again."""
        self._tables = other._tables
        self._lengths = other._lengths
        self._probes = other._probes
        self._config = other._config
        self._blocked = other._blocked
        self.generation += 1

    # ------------------------------------------------------------------ reading

    def probes(self, width: int) -> Probes:
        """The tables an address of ``width`` bytes (4 or 16) is looked up in, longest
        prefix first (the compiled loop's view; replaced, never changed, by an edit
        that adds or empties a prefix length)."""
        return self._probes.get(width, ())

    def covers_ipv6(self) -> bool:
        """Is there any IPv6 entry? (If not, every IPv6 lookup is None: the compiled
        loop then skips the lookup Pipeline.decide makes for each IPv6 packet.)"""
        return bool(self._lengths[16])

    def entries(self) -> list[AclEntry]:
        """Every entry of both layers (one network may appear twice: once per layer)."""
        found: list[AclEntry] = []
        for table in self._tables.values():
            for value in table.values():
                if isinstance(value, tuple):
                    found.extend(value)
                else:
                    found.append(value)
        return found

    def config_entries(self) -> list[AclEntry]:
        return list(self._config.values())

    def blocklist_entries(self) -> list[AclEntry]:
        return list(self._blocklist_layer().values())

    def _blocklist_layer(self) -> dict[Key, AclEntry]:
        layer = self._config
        found: dict[Key, AclEntry] = {}
        for (width, prefixlen), table in self._tables.items():
            code = prefixlen if width == 4 else 33 + prefixlen
            for prefix, value in table.items():
                key = _prefix_of(prefix, prefixlen) << 8 | code
                if isinstance(value, tuple):
                    found[key] = value[0]
                elif layer.get(key) is not value:
                    found[key] = value
        return found

    def lookup(self, packed: bytes, now_ns: int) -> AclEntry | None:
        """The active entry with the longest prefix covering ``packed``, if any. On one
        prefix the blocklist's entry while it is active, then the configuration's; an
        expired entry uncovers what lies beneath it."""
        probes = self._probes.get(len(packed))
        if not probes:
            return None
        if _compiled_longest_match is not None:
            return _compiled_longest_match(probes, packed, now_ns)
        return longest_match(probes, packed, now_ns)

    def __len__(self) -> int:
        """Entries in both layers (a network in both counts twice)."""
        return len(self._config) + self._blocked
