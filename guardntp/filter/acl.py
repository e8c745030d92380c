"""Access lists: allow and deny by CIDR, IPv4 and IPv6, longest prefix wins.

Rule: a lookup is by packed address bytes, over two layers: the configuration's
``[[acl]]`` entries (a few: one table per prefix length of :class:`AclEntry`
objects, keyed by the prefix's bytes, the network address cut after its last
whole or partial byte) and the blocklist's (up to millions, with an origin and
an expiry: one compact ``_fastlane.BlockTable``, whose slot per network holds
the number of a shared :class:`BlockVerdict`, ~20-30 bytes an entry). A lookup
is at most one probe per prefix length in use in either layer, longest first;
where the extension is built it is compiled (``_fastlane.longest_match``, which
the packet loop calls directly), and :func:`longest_match` over
:class:`DictBlockTable` is its reference model and the lookup without a
compiler. On one prefix the blocklist entry wins while it is active; an expired
entry uncovers what lies beneath it (the configuration's entry on the same
prefix, else a shorter prefix). The blocklist changes by difference: a ``block
add`` among a million entries writes one slot, not a new table.
"""
from __future__ import annotations

import enum
import ipaddress
import socket
import weakref
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..netaddr import BadAddress

try:
    from .._fastlane import AddressTable, BlockTable
    from .._fastlane import longest_match as _compiled_longest_match
except ImportError:  # no C compiler at install: dicts, and the lookup below
    AddressTable = None  # type: ignore[assignment, misc]
    BlockTable = None  # type: ignore[assignment, misc]
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


#: The longest text taken as a network: the longest CIDR, with room to spare
#: (``ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128`` is 49 characters).
MAX_NETWORK_TEXT = 100


def parse_network(text: str, strict: bool = True) -> Network:
    """A CIDR or a bare address. With ``strict``, host bits past the prefix are an error.
    IPv4-mapped IPv6 comes back as the IPv4 network (:func:`as_seen_by_the_filter`).
    A scoped IPv6 address (``fe80::1%eth0``) is refused: the filter sees sources
    without a scope, and an entry stored with one could not be exported or removed
    as written."""
    stripped = text.strip()
    if len(stripped) > MAX_NETWORK_TEXT:
        raise BadAddress(f"{stripped[:40]!r}... ({len(stripped)} characters) is too long "
                         "for an IPv4 or IPv6 address or CIDR")
    if "%" in stripped:
        address, _, scope = stripped.partition("%")
        suffix = "/" + scope.partition("/")[2] if "/" in scope else ""
        raise BadAddress(f"{stripped!r}: a network has no scope "
                         f"(%{scope.partition('/')[0]}); write {address + suffix}")
    try:
        network = ipaddress.ip_network(stripped, strict=strict)
    except ValueError as error:
        message = str(error)
        if "host bits set" in message:
            network = ipaddress.ip_network(text.strip(), strict=False)
            raise BadAddress(f"{text.strip()!r} has host bits set past the /{network.prefixlen}; "
                             f"did you mean {as_seen_by_the_filter(network)}?") from None
        raise BadAddress(f"{text.strip()!r} is not an IPv4 or IPv6 address or CIDR") from None
    return as_seen_by_the_filter(network)


#: (address width in bytes, prefix length) of each configuration table, by a small
#: code: IPv4 /0-/32 are codes 0-32, IPv6 /0-/128 codes 33-161.
_WHERE = [(4, prefixlen) for prefixlen in range(33)] + [(16, prefixlen)
                                                        for prefixlen in range(129)]
#: Where a configuration entry lives in an :class:`AccessList`: its network's address
#: shifted past the host bits, shifted 8 bits left over its table's code.
Key = int
#: A network as the blocklist layer keys it: (the network address, 4 or 16 bytes,
#: host bits zero; the prefix length).
NetworkKey = tuple[bytes, int]
#: One prefix length's configuration entries, by the prefix's bytes (:func:`_prefix_bytes`).
PrefixTable = MutableMapping[bytes, "AclEntry"]
#: Per address width, the configuration tables in use, longest prefix first.
Probes = tuple[tuple[int, PrefixTable], ...]
#: What a blocklist change writes: (network address, prefix length, verdict or None).
BlockOp = tuple[bytes, int, "BlockVerdict | None"]


@dataclass(frozen=True, slots=True, weakref_slot=True)
class BlockVerdict:
    """What a blocklist entry says, without its network: the value the blocklist layer
    keeps for each network, and what a lookup that lands on one returns. Entries that
    say the same share one (an import of a million: one action, origin, reason and
    expiry), so an entry costs its key in a compact table and nothing else."""

    action: Action
    origin: str
    reason: str
    expires_ns: int | None          # wall-clock Unix ns; None = never

    def active(self, now_ns: int) -> bool:
        return self.expires_ns is None or now_ns < self.expires_ns


#: What a lookup finds: a configuration entry, or a blocklist entry's verdict.
Match = AclEntry | BlockVerdict


class DictBlockTable:
    """The blocklist layer where the extension is not built, and the reference model
    of ``_fastlane.BlockTable``: the same methods over a dict of verdicts by network."""

    __slots__ = ("_entries", "_lengths")

    def __init__(self) -> None:
        self._entries: dict[NetworkKey, BlockVerdict] = {}
        #: Per (width, prefix length) in use, how many entries it holds.
        self._lengths: dict[tuple[int, int], int] = {}

    def apply(self, ops: Iterable[BlockOp]) -> None:
        """Puts (a verdict) and deletions (None) in order, after checking every one:
        a bad op raises TypeError or ValueError with nothing changed."""
        checked = [(_network_key(packed, prefixlen), verdict) for packed, prefixlen, verdict
                   in _triples(ops)]
        entries, lengths = self._entries, self._lengths
        for key, verdict in checked:
            where = (len(key[0]), key[1])
            if verdict is None:
                if entries.pop(key, None) is not None:
                    lengths[where] -= 1
                    if not lengths[where]:
                        del lengths[where]
            else:
                if key not in entries:
                    lengths[where] = lengths.get(where, 0) + 1
                entries[key] = verdict

    def get(self, packed: bytes, prefixlen: int) -> BlockVerdict | None:
        return self._entries.get(_network_key(packed, prefixlen))

    def __len__(self) -> int:
        return len(self._entries)

    def lengths(self, width: int) -> tuple[int, ...]:
        if width not in (4, 16):
            raise ValueError("an address is 4 or 16 bytes wide")
        return tuple(sorted((length for w, length in self._lengths if w == width),
                            reverse=True))

    def items(self) -> list[tuple[bytes, int, BlockVerdict]]:
        return [(packed, prefixlen, verdict)
                for (packed, prefixlen), verdict in self._entries.items()]

    def verdicts(self) -> list[tuple[BlockVerdict, int]]:
        uses: dict[int, list[Any]] = {}
        for verdict in self._entries.values():
            held = uses.get(id(verdict))
            if held is None:
                uses[id(verdict)] = [verdict, 1]
            else:
                held[1] += 1
        return [(verdict, count) for verdict, count in uses.values()]

    def purge(self, verdicts: Iterable[BlockVerdict], start: int,
              max_slots: int) -> tuple[int, int]:
        """Every entry whose verdict is one of ``verdicts`` goes, in one pass."""
        doomed = {id(verdict) for verdict in verdicts}
        gone = [(packed, prefixlen, None) for (packed, prefixlen), verdict
                in self._entries.items() if id(verdict) in doomed]
        self.apply(gone)
        return len(gone), 0

    def release(self, max_bytes: int) -> int:
        """Memory held for giving back: none here (a dict frees what it drops)."""
        if max_bytes < 1:
            raise ValueError("release(): max_bytes must be 1 to 2**63 - 1")
        return 0


def _triples(ops: Iterable[BlockOp]) -> list[BlockOp]:
    triples = list(ops)
    for op in triples:
        if not isinstance(op, tuple) or len(op) != 3:
            raise TypeError(f"a blocklist op is (packed, prefixlen, verdict), not {op!r}")
    return triples


def _network_key(packed: bytes, prefixlen: int) -> NetworkKey:
    """``(packed, prefixlen)`` checked: 4 or 16 bytes, a prefix length that fits, no
    host bits set past it."""
    if packed.__class__ is not bytes or len(packed) not in (4, 16):
        raise TypeError(f"a network address is 4 or 16 bytes, not {packed!r}")
    bits = 8 * len(packed)
    if prefixlen.__class__ is not int or not 0 <= prefixlen <= bits:
        raise ValueError(f"a prefix length is 0 to {bits}, not {prefixlen!r}")
    if _host_bits_set(packed, prefixlen):
        raise ValueError(f"host bits set past the /{prefixlen} in {packed.hex()}")
    return packed, prefixlen


def _new_table() -> PrefixTable:
    return {} if AddressTable is None else AddressTable()


def _new_block_table() -> DictBlockTable | BlockTable:
    return DictBlockTable() if BlockTable is None else BlockTable()


def _prefix_bytes(prefix: int, prefixlen: int) -> bytes:
    """A table's key: the ``prefixlen`` bits of ``prefix`` (a network address shifted
    past its host bits), written in the bytes they cover, the rest of the last byte
    zero; a /0 is one zero byte."""
    size = max(1, (prefixlen + 7) // 8)
    return (prefix << (8 * size - prefixlen)).to_bytes(size, "big")


def _host_bits_set(packed: bytes, prefixlen: int) -> bool:
    """Is any bit of ``packed`` past the first ``prefixlen`` set?"""
    return bool(int.from_bytes(packed, "big") & ((1 << (8 * len(packed) - prefixlen)) - 1))


def _masked(packed: bytes, prefixlen: int) -> bytes:
    """The address of the /``prefixlen`` network holding ``packed``."""
    bits = 8 * len(packed)
    return (int.from_bytes(packed, "big") >> (bits - prefixlen) << (bits - prefixlen)
            ).to_bytes(len(packed), "big")


def longest_match(probes: Probes, block: DictBlockTable | BlockTable | None, packed: bytes,
                  now_ns: int) -> Match | None:
    """The active entry with the longest prefix covering ``packed``, over both layers:
    ``probes``, the configuration's tables for its width (longest first), and
    ``block``, the blocklist layer. On one prefix the blocklist's while it is active,
    then the configuration's; an expired entry uncovers what lies beneath it. The
    reference model of ``_fastlane.longest_match``."""
    tables = dict(probes)
    blocked = () if block is None else block.lengths(len(packed))
    for prefixlen in sorted(tables.keys() | set(blocked), reverse=True):
        if prefixlen in blocked:
            verdict = block.get(_masked(packed, prefixlen), prefixlen)  # type: ignore[union-attr]
            if verdict is not None and verdict.active(now_ns):
                return verdict
        table = tables.get(prefixlen)
        if table is not None:
            size = max(1, (prefixlen + 7) // 8)
            spare = 8 * size - prefixlen
            key = packed[:size]
            if spare:
                key = key[:-1] + bytes((key[-1] >> spare << spare,))
            entry = table.get(key)
            if entry is not None and entry.active(now_ns):
                return entry
    return None


def _packed_key(packed: bytes, prefixlen: int) -> Key:
    """The key of the network at ``packed`` (4 or 16 bytes) / ``prefixlen``."""
    if len(packed) == 4:
        return int.from_bytes(packed, "big") >> (32 - prefixlen) << 8 | prefixlen
    return int.from_bytes(packed, "big") >> (128 - prefixlen) << 8 | (33 + prefixlen)


def _checked(entry: AclEntry) -> Key:
    """The key of ``entry``, after checking it is one (a lookup must not fail later)."""
    expires_ns = getattr(entry, "expires_ns", None)
    if (not isinstance(entry, AclEntry) or not isinstance(entry.action, Action)
            or (expires_ns is not None and expires_ns.__class__ is not int)):
        raise TypeError(f"not an access-list entry (an action, expires_ns an int or "
                        f"None): {entry!r}")
    return _packed_key(entry.packed, entry.prefixlen)


def network_key(network: Network | AclEntry | NetworkKey) -> NetworkKey:
    """How the blocklist layer keys a network given as a network, an entry on it, or
    already as ``(packed, prefixlen)``. Raises TypeError for anything else."""
    if isinstance(network, AclEntry):
        return network.packed, network.prefixlen
    if isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return network.network_address.packed, network.prefixlen
    if isinstance(network, tuple) and len(network) == 2:
        try:
            return _network_key(*network)
        except ValueError as error:
            raise TypeError(str(error)) from None
    raise TypeError(f"not an IPv4 or IPv6 network: {network!r}")


def network_key_of_text(cidr: str) -> NetworkKey:
    """``(packed, prefixlen)`` of a network written as ``str()`` of an ``ipaddress``
    network (the blocklist store's key), without making the network: a load that
    compares a million rows parses each one. The socket module's parser takes what
    :mod:`ipaddress` takes of an address but scoped IPv6 (both refuse leading zeros in
    IPv4); any other form is read by :mod:`ipaddress` as it would be (strict: no host
    bits), or refused with its ValueError."""
    if cidr.__class__ is not str:
        raise TypeError(f"a network is text, not {cidr!r}")
    address, _, length = cidr.partition("/")
    if length.isdigit() and length.isascii() and (length[0] != "0" or length == "0"):
        try:
            packed = _inet_pton(_AF_INET6 if ":" in address else _AF_INET, address)
        except OSError:
            pass
        else:
            prefixlen = int(length)
            if prefixlen <= 8 * len(packed) and not _host_bits_set(packed, prefixlen):
                return packed, prefixlen
    network = ipaddress.ip_network(cidr)    # the rare form: its reading, or its error
    return network.network_address.packed, network.prefixlen


_inet_pton = socket.inet_pton
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


class AclChange:
    """A change to an :class:`AccessList`, worked out and checked by
    :meth:`AccessList.plan` without touching the list, applied by
    :meth:`AccessList.apply`: the blocklist's writes all or nothing, then the
    configuration's, which cannot fail."""

    __slots__ = ("generation", "writes", "new_tables", "config", "block_ops")

    def __init__(self, generation: int, writes: list[tuple[PrefixTable, bytes, AclEntry | None]],
                 new_tables: dict[tuple[int, int], PrefixTable],
                 config: dict[Key, AclEntry] | None, block_ops: list[BlockOp]) -> None:
        #: The list's generation the change was worked out against.
        self.generation = generation
        #: Into configuration tables the list has already: (table, key, entry or None).
        self.writes = writes
        #: Configuration tables for prefix lengths not in use yet, filled already.
        self.new_tables = new_tables
        self.config = config       # the new configuration layer, or None: unchanged
        #: The blocklist layer's writes, each one a change of what it holds.
        self.block_ops = block_ops

    def __bool__(self) -> bool:
        """Does it change any lookup?"""
        return bool(self.writes or self.new_tables or self.block_ops)


class AccessList:
    """Longest-prefix-match table over two layers: the configuration's ``[[acl]]``
    entries and the live blocklist's. ``generation`` changes on every edit, so callers
    may cache a lookup result per source and re-check only when it moves (or when
    the cached entry expires: the result can change then and only then).

    The configuration layer (a few entries) is one table per (address width, prefix
    length) in use, keyed by the prefix's bytes (:func:`_prefix_bytes`), of
    :class:`AclEntry` objects. The blocklist layer (up to millions) is one
    ``block_table`` (``_fastlane.BlockTable``: one compact slot per network holding
    the number of a shared :class:`BlockVerdict`). A lookup visits the prefix lengths
    either layer uses, longest first.
    """

    __slots__ = ("_tables", "_probes", "_config", "block_table", "_verdicts", "_purge_at",
                 "generation")

    def __init__(self, entries: Iterable[AclEntry] | None = None,
                 blocklist: Iterable[AclEntry] | None = None) -> None:
        """``entries``: the configuration layer; ``blocklist``: the blocklist layer."""
        self._tables: dict[tuple[int, int], PrefixTable] = {}
        self._config: dict[Key, AclEntry] = {}
        #: Per address width: (prefix length, table) of the configuration, longest first.
        self._probes: dict[int, Probes] = {4: (), 16: ()}
        self.block_table = _new_block_table()
        #: One verdict per distinct (action, origin, reason, expiry) in use: the table
        #: holds them, this finds them (and forgets one when no entry holds it).
        self._verdicts: weakref.WeakValueDictionary[tuple[Any, ...], BlockVerdict] = \
            weakref.WeakValueDictionary()
        #: Where the sweep of lapsed blocklist entries goes on from (0: from the start).
        self._purge_at = 0
        self.generation = 0
        if entries is not None or blocklist is not None:
            self.apply(self.plan(config=entries, added=blocklist or ()))

    # ------------------------------------------------------------------ changes

    def verdict_of(self, entry: AclEntry) -> BlockVerdict:
        """The shared verdict of what ``entry`` says (checked: TypeError if it is not
        an entry)."""
        _checked(entry)
        return self.verdict(entry.action, entry.origin, entry.reason, entry.expires_ns)

    def verdict(self, action: Action, origin: str, reason: str,
                expires_ns: int | None) -> BlockVerdict:
        """The shared verdict saying this (checked: TypeError for anything else)."""
        said = (action, origin, reason, expires_ns)
        verdict = self._verdicts.get(said)
        if verdict is None:
            if (not isinstance(action, Action) or not isinstance(origin, str)
                    or not isinstance(reason, str)
                    or (expires_ns is not None and expires_ns.__class__ is not int)):
                raise TypeError(f"a verdict is an action, origin and reason text and "
                                f"expires_ns an int or None, not {said!r}")
            verdict = self._verdicts[said] = BlockVerdict(*said)
        return verdict

    def plan(self, config: Iterable[AclEntry] | None = None, added: Iterable[AclEntry] = (),
             removed: Iterable[Network | AclEntry | NetworkKey] = ()) -> AclChange:
        """Work out a change without making it: with ``config``, that list becomes the
        configuration layer; the blocklist layer loses the entries on ``removed``
        networks (given as networks, as the entries on them, or as ``(packed,
        prefixlen)``), then gains ``added`` (each replacing the blocklist entry on its
        network, if any). Only the keys these name are visited. Raises TypeError for
        anything that is not an entry (or a network), with nothing changed."""
        config_layer = None if config is None else {_checked(entry): entry for entry in config}
        wanted: dict[NetworkKey, BlockVerdict | None] = {
            network_key(network): None for network in removed}
        for entry in added:
            verdict = self.verdict_of(entry)
            wanted[(entry.packed, entry.prefixlen)] = verdict
        return self._plan(config_layer, wanted)

    def _plan(self, config: dict[Key, AclEntry] | None,
              wanted: dict[NetworkKey, BlockVerdict | None]) -> AclChange:
        """``config``: the new configuration layer (None: as it is); ``wanted``: per
        network, the blocklist verdict to hold there (None: none)."""
        get = self.block_table.get
        block_ops = [(packed, prefixlen, verdict) for (packed, prefixlen), verdict
                     in wanted.items() if get(packed, prefixlen) is not verdict]
        writes: list[tuple[PrefixTable, bytes, AclEntry | None]] = []
        new_tables: dict[tuple[int, int], PrefixTable] = {}
        if config is not None:
            tables = self._tables
            layer = self._config
            for key in config.keys() | layer.keys():
                old, new = layer.get(key), config.get(key)
                if old is new:
                    continue
                where = _WHERE[key & 0xFF]
                prefix = _prefix_bytes(key >> 8, where[1])
                table = tables.get(where)
                if table is not None:
                    writes.append((table, prefix, new))
                elif new is not None:
                    new_table = new_tables.get(where)
                    if new_table is None:
                        new_table = new_tables[where] = _new_table()
                    new_table[prefix] = new
        return AclChange(self.generation, writes, new_tables, config, block_ops)

    def apply(self, change: AclChange) -> None:
        """Make a change :meth:`plan` worked out, bumping the generation once (if any
        lookup may change). The blocklist's writes go first, all or nothing (a table
        that cannot grow raises MemoryError with nothing changed); the configuration's
        are plain stores and deletions of a few keys. A change planned against another
        generation is refused (RuntimeError) before anything is touched."""
        if change.generation != self.generation:
            raise RuntimeError("access-list change planned against another generation")
        if change.block_ops:
            self.block_table.apply(change.block_ops)
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
        self.generation += 1

    def _index(self) -> None:
        lengths: dict[int, list[int]] = {4: [], 16: []}
        for width, prefixlen in self._tables:
            lengths[width].append(prefixlen)
        tables = self._tables
        self._probes = {width: tuple((prefixlen, tables[(width, prefixlen)])
                                     for prefixlen in sorted(prefixlens, reverse=True))
                        for width, prefixlens in lengths.items()}

    def set_config(self, entries: Iterable[AclEntry]) -> None:
        """Make ``entries`` the configuration layer; the blocklist layer stays."""
        self.apply(self.plan(config=entries))

    def update_blocklist(self, added: Iterable[AclEntry] = (),
                         removed: Iterable[Network | AclEntry | NetworkKey] = ()) -> None:
        """Remove the blocklist entries on ``removed``, then add ``added``: only these
        keys are touched, and the generation moves once."""
        self.apply(self.plan(added=added, removed=removed))

    def blocklist_plan(self, entries: Iterable[AclEntry]) -> AclChange:
        """The change that makes ``entries`` the whole blocklist layer: only networks
        whose verdict differs from the present one are written."""
        wanted: dict[NetworkKey, BlockVerdict | None] = {}
        for entry in entries:
            verdict = self.verdict_of(entry)
            wanted[(entry.packed, entry.prefixlen)] = verdict
        for packed, prefixlen, _ in self.block_table.items():
            wanted.setdefault((packed, prefixlen), None)
        return self._plan(None, wanted)

    def set_blocklist(self, entries: Iterable[AclEntry]) -> None:
        self.apply(self.blocklist_plan(entries))

    def write_blocklist(self, wanted: dict[NetworkKey, BlockVerdict | None]) -> None:
        """Per network, the verdict (from :meth:`verdict`) the blocklist layer holds
        there from now on, or None for none: what a load hands over without making an
        entry per row. Only networks whose verdict changes are written; all or nothing
        (a bad network or verdict: ValueError or TypeError, nothing changed)."""
        self.apply(self._plan(None, wanted))

    def add(self, entry: AclEntry, blocklist: bool = False) -> None:
        """One entry into the configuration layer (or, with ``blocklist``, that layer)."""
        if blocklist:
            self.update_blocklist(added=(entry,))
        else:
            self.apply(self._plan({**self._config, _checked(entry): entry}, {}))

    def remove(self, network: Network, blocklist: bool = False) -> bool:
        """Take the entry on ``network`` out of one layer; was there one?"""
        if blocklist:
            change = self._plan(None, {network_key(network): None})
        else:
            key = _packed_key(*network_key(network))
            if key not in self._config:
                return False
            change = self._plan({k: e for k, e in self._config.items() if k != key}, {})
        if not change:
            return False
        self.apply(change)
        return True

    def expire_blocklist(self, now_ns: int, max_slots: int) -> int:
        """Sweep out blocklist entries that have lapsed by ``now_ns`` (a lookup ignores
        them already: this only keeps the table small), visiting at most ``max_slots``
        of its slots, so that the packet loop waits little however large the list.
        Returns how many lapsed entries the table still holds (0: the sweep is done)."""
        table = self.block_table
        lapsed = self._lapsed(now_ns)
        if not lapsed:
            self._purge_at = 0
            return 0
        removed, self._purge_at = table.purge([verdict for verdict, _ in lapsed],
                                              self._purge_at, max_slots)
        if removed:
            self.generation += 1
        return sum(uses for _, uses in lapsed) - removed

    def lapsed_blocklist_entries(self, now_ns: int) -> int:
        """Blocklist entries that have lapsed by ``now_ns`` and are not swept out yet."""
        return sum(uses for _, uses in self._lapsed(now_ns))

    def _lapsed(self, now_ns: int) -> list[tuple[BlockVerdict, int]]:
        return [(verdict, uses) for verdict, uses in self.block_table.verdicts()
                if verdict.expires_ns is not None and verdict.expires_ns <= now_ns]

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
        self._probes = other._probes
        self._config = other._config
        self.block_table = other.block_table
        self._verdicts = other._verdicts
        self._purge_at = 0
        self.generation += 1

    # ------------------------------------------------------------------ reading

    def probes(self, width: int) -> Probes:
        """The configuration tables an address of ``width`` bytes (4 or 16) is looked up
        in, longest prefix first (the compiled loop's view; replaced, never changed, by
        an edit that adds or empties a prefix length)."""
        return self._probes.get(width, ())

    def covers_ipv6(self) -> bool:
        """Is there any IPv6 entry? (If not, every IPv6 lookup is None: the compiled
        loop then skips the lookup Pipeline.decide makes for each IPv6 packet.)"""
        return bool(self._probes[16]) or bool(self.block_table.lengths(16))

    def entries(self) -> list[AclEntry]:
        """Every entry of both layers (one network may appear twice: once per layer)."""
        return [*self._config.values(), *self.blocklist_entries()]

    def config_entries(self) -> list[AclEntry]:
        return list(self._config.values())

    def blocklist_entries(self) -> list[AclEntry]:
        """The blocklist layer's entries, made from its networks and verdicts."""
        return [AclEntry(None, verdict.action, verdict.origin, verdict.reason,
                         verdict.expires_ns, packed=packed, prefixlen=prefixlen)
                for packed, prefixlen, verdict in self.block_table.items()]

    def blocklist_verdict(self, network: Network | AclEntry | NetworkKey) -> BlockVerdict | None:
        """What the blocklist layer holds on ``network`` (lapsed or not), if anything."""
        if network.__class__ is tuple and len(network) == 2:   # (a load's hot path)
            try:
                return self.block_table.get(*network)   # (it checks the key itself)
            except ValueError as error:
                raise TypeError(str(error)) from None
        return self.block_table.get(*network_key(network))

    def lookup(self, packed: bytes, now_ns: int) -> Match | None:
        """The active entry with the longest prefix covering ``packed``, if any. On one
        prefix the blocklist's entry while it is active, then the configuration's; an
        expired entry uncovers what lies beneath it."""
        probes = self._probes.get(len(packed))
        if probes is None:
            return None
        if _compiled_longest_match is not None:
            # (a BlockTable: the extension that has the lookup made the table)
            return _compiled_longest_match(probes, self.block_table, packed,  # type: ignore[arg-type]
                                           now_ns)
        return longest_match(probes, self.block_table, packed, now_ns)

    def __len__(self) -> int:
        """Entries in both layers (a network in both counts twice)."""
        return len(self._config) + len(self.block_table)
